import pytest

from rayalign import checkpoint


def test_atomic_write_latest_and_prune(tmp_path):
    for step in (1, 2, 3):
        checkpoint.write(tmp_path, step, lambda d: (d / "w.bin").write_bytes(b"x") and {"a": step}, keep=2)
    assert checkpoint.latest(tmp_path).name == "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert checkpoint.read_state(checkpoint.latest(tmp_path)) == {"a": 3, "step": 3, "format": 1}


def test_failed_write_keeps_previous(tmp_path):
    checkpoint.write(tmp_path, 1, lambda d: {"ok": True})

    def boom(d):
        (d / "half").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.write(tmp_path, 2, boom)
    assert checkpoint.latest(tmp_path).name == "step_00000001"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir() if p.is_dir())


def test_latest_without_checkpoint(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.latest(tmp_path)
