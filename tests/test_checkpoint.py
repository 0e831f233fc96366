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
    assert (checkpoint.step_dir(tmp_path / "policy", 4) / "state.json").is_file()
    assert (checkpoint.step_dir(tmp_path / "critic", 4) / "state.json").is_file()
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
