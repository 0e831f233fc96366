import json
import os

import pytest
import torch
from safetensors import safe_open

from rayalign import checkpoint


def _name(p):
    return os.path.basename(str(p))


def test_atomic_write_latest_and_prune(tmp_path):
    for step in (1, 2, 3):
        checkpoint.write(tmp_path, step, lambda d: (d / "w.bin").write_bytes(b"x") and {"a": step}, keep=2)
    assert _name(checkpoint.latest(tmp_path)) == "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert checkpoint.read_state(checkpoint.latest(tmp_path)) == {"a": 3, "step": 3, "format": 2}


def test_failed_write_keeps_previous(tmp_path):
    checkpoint.write(tmp_path, 1, lambda d: {"ok": True})

    def boom(d):
        (d / "half").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.write(tmp_path, 2, boom)
    assert _name(checkpoint.latest(tmp_path)) == "step_00000001"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000001"]


def test_unfinished_save_is_never_resumed_and_is_pruned(tmp_path):
    """A multi-rank save that died after some shards were written: no state.json, so the
    previous step stays the one to resume, and the next completed save prunes the debris."""
    checkpoint.write(tmp_path, 1, lambda d: {"ok": 1}, keep=1)
    d = checkpoint.begin(tmp_path, 2)
    (tmp_path / "step_00000002" / "shard-00000-of-00002.safetensors").write_bytes(b"half")
    assert not checkpoint.is_complete(d)
    assert _name(checkpoint.latest(tmp_path)) == "step_00000001"
    checkpoint.write(tmp_path, 3, lambda d: {"ok": 3}, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003"]
    # Re-saving a step replaces whatever an unfinished save of it left.
    checkpoint.begin(tmp_path, 4)
    (tmp_path / "step_00000004" / "shard-00001-of-00002.safetensors").write_bytes(b"half")
    checkpoint.write(tmp_path, 4, lambda d: {"ok": 4}, keep=0)
    assert not (tmp_path / "step_00000004" / "shard-00001-of-00002.safetensors").exists()


def test_latest_without_checkpoint(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.latest(tmp_path)


def test_file_uri_and_memory_filesystem_roots(tmp_path):
    uri = f"file://{tmp_path}/ck"
    checkpoint.write(uri, 5, lambda d: (d / "a.txt").write_text("hi") and {"x": 1})
    assert checkpoint.read_state(checkpoint.latest(uri))["x"] == 1
    assert (tmp_path / "ck" / "step_00000005" / "a.txt").read_text() == "hi"
    # A non-local filesystem: files are written locally and uploaded, pointers put whole.
    mem = "memory://rayalign-test/ck"
    checkpoint.write(mem, 7, lambda d: (d / "b.txt").write_text("there") and {"y": 2})
    assert checkpoint.read_state(checkpoint.latest(mem))["y"] == 2
    assert checkpoint.read_text(checkpoint.join(checkpoint.latest(mem), "b.txt")) == "there"
    with pytest.raises(checkpoint.CheckpointError, match="fsspec backend"):
        checkpoint.exists("nosuchscheme://x/y")


def _save(root, role, step):
    return checkpoint.write(root / role, step, lambda d: {"role": role}, keep=0)


def test_commit_of_several_roles_survives_a_crash_between_their_saves(tmp_path):
    for step in (2, 4):
        _save(tmp_path, "critic", step)
        _save(tmp_path, "policy", step)
        checkpoint.commit(tmp_path, step, ["policy", "critic"], keep=1)
    assert checkpoint.last_commit(tmp_path)["step"] == 4
    # Only the committed step is kept, for both roles.
    assert sorted(p.name for p in (tmp_path / "critic").glob("step_*")) == ["step_00000004"]
    # A crash after the critic saved step 6 and before the policy did: step 4 is still whole.
    _save(tmp_path, "critic", 6)
    c = checkpoint.last_commit(tmp_path)
    assert c["step"] == 4 and c["roles"] == ["policy", "critic"]
    assert checkpoint.is_complete(checkpoint.step_dir(tmp_path / "policy", 4))
    assert checkpoint.is_complete(checkpoint.step_dir(tmp_path / "critic", 4))
    # Committing a step a role has not saved is refused and changes nothing.
    with pytest.raises(checkpoint.CheckpointError, match="role 'policy' has no complete checkpoint"):
        checkpoint.commit(tmp_path, 6, ["policy", "critic"], keep=1)
    assert checkpoint.last_commit(tmp_path)["step"] == 4
    # The resumed run saves step 6 again (replacing the partial one) and commits it.
    _save(tmp_path, "critic", 6)
    _save(tmp_path, "policy", 6)
    checkpoint.commit(tmp_path, 6, ["policy", "critic"], keep=2)
    assert checkpoint.last_commit(tmp_path)["kept"] == [4, 6]
    assert sorted(p.name for p in (tmp_path / "policy").glob("step_*")) == ["step_00000004", "step_00000006"]


def test_commit_pointing_at_a_removed_checkpoint_is_an_error(tmp_path):
    _save(tmp_path, "policy", 1)
    checkpoint.commit(tmp_path, 1, ["policy"])
    import shutil
    shutil.rmtree(checkpoint.step_dir(tmp_path / "policy", 1))
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.last_commit(tmp_path)


def test_streamed_safetensors_is_readable_by_safetensors(tmp_path):
    ts = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
          "c": torch.arange(5, dtype=torch.int64)[1:4]}  # a view into a larger tensor
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()]
    n = checkpoint.write_safetensors(tmp_path / "x.safetensors", specs, iter(ts.values()), {"format": "pt"})
    assert n == (tmp_path / "x.safetensors").stat().st_size
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in ts.items():
            assert torch.equal(f.get_tensor(k), v)
    # A tensor that does not match its spec is refused, naming it.
    with pytest.raises(checkpoint.CheckpointError, match="b has shape"):
        checkpoint.write_safetensors(tmp_path / "y.safetensors", specs, iter([ts["a"], ts["a"], ts["c"]]))
    # Converted to the declared dtype on the way out.
    checkpoint.write_safetensors(tmp_path / "z.safetensors", [("a", torch.float16, (2, 3))], iter([ts["a"]]))
    with safe_open(str(tmp_path / "z.safetensors"), "pt") as f:
        assert f.get_tensor("a").dtype == torch.float16


def test_shards_read_ranges_across_ranks_and_only_the_files_needed(tmp_path):
    """Two 'ranks' each saved part of a flattened 10-element parameter (ZeRO-style uneven
    fragments) and all of another; any range reads back exactly, from the files holding it."""
    full = torch.arange(10, dtype=torch.float32) * 0.5
    other = torch.randn(2, 2)
    d = tmp_path / "step"
    d.mkdir()
    checkpoint.write_shard(d, 0, 2, [("w", (2, 5), 0, {"weight": full[:7], "exp_avg": full[:7] + 1}),
                                     ("v", (2, 2), 0, {"weight": other.view(-1)})])
    checkpoint.write_shard(d, 1, 2, [("w", (2, 5), 7, {"weight": full[7:], "exp_avg": full[7:] + 1})])
    with checkpoint.Shards(d) as sh:
        assert sh.shapes == {"w": (2, 5), "v": (2, 2)}
        assert torch.equal(sh.read("weight", "w", 2, 6), full[2:6])
        assert sh.files_read == {"shard-00000-of-00002.safetensors"} and sh.bytes_read == 16
        assert torch.equal(sh.read("exp_avg", "w"), full + 1)
        assert torch.equal(sh.read("weight", "v").view(2, 2), other)
        assert sh.has("exp_avg", "w") and not sh.has("exp_avg", "v")
        with pytest.raises(checkpoint.CheckpointError, match="no exp_avg_sq saved"):
            sh.read("exp_avg_sq", "w")
    # A lost shard is named, not read as zeros.
    os.remove(d / "shard-00001-of-00002.safetensors")
    with checkpoint.Shards(d) as sh, pytest.raises(checkpoint.CheckpointError, match="a shard file is missing"):
        sh.read("weight", "w", 5, 9)
    meta = json.loads(safe_open(str(d / "shard-00000-of-00002.safetensors"), "pt").metadata()["fragments"])
    assert meta == {"w": [0, [2, 5]], "v": [0, [2, 2]]}
