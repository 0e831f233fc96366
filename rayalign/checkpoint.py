"""The one way to save training state: atomic, world-size independent checkpoints.

A checkpoint is a directory ``step_00000012/`` holding

* ``model/`` — the full fp32 weights as a Hugging Face model (loadable on its own),
* ``optimizer.safetensors`` — full (unpartitioned) Adam moments by parameter name,
* ``state.json`` — step counters, scheduler position, the trainer's own state.

Nothing in it depends on how many ranks wrote it or how ZeRO partitioned it, so a
run saved on 2 workers resumes on 1 or 4. Directories are written under a temporary
name and renamed; ``latest`` is replaced atomically last, so a crash mid-save leaves
the previous checkpoint as the one to resume.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import RayalignError


class CheckpointError(RayalignError, RuntimeError):
    pass


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def write(root: str | Path, step: int, fill: Callable[[Path], dict[str, Any]], keep: int = 2) -> Path:
    """Create checkpoint ``step`` under ``root``: ``fill(tmpdir)`` writes the files and returns
    the state to record. Older checkpoints beyond ``keep`` are pruned."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        state = fill(tmp)
        state = dict(state, step=step, format=1)
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(root / "latest", final.name + "\n")
    if keep > 0:
        olds = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in olds[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: str | Path) -> Path | None:
    root = Path(root)
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    d = root / ptr.read_text().strip()
    if not (d / "state.json").is_file():
        raise CheckpointError(f"{ptr} points to {d}, which is not a complete checkpoint")
    return d


def read_state(ckpt: str | Path) -> dict[str, Any]:
    p = Path(ckpt) / "state.json"
    if not p.is_file():
        raise CheckpointError(f"{ckpt} is not a checkpoint (no state.json)")
    return json.loads(p.read_text())


COMMIT_FILE = "committed.json"


def commit(root: str | Path, step: int, roles: list[str], keep: int = 1) -> None:
    """Record that every role under ``root/<role>/`` has saved ``step``: the one point at which a
    checkpoint of several roles becomes the one to resume. Roles save with ``keep=0`` (no pruning
    of their own) so that a crash between two roles' saves leaves the previous commit whole;
    pruning happens here, after the commit, and keeps the newest ``keep`` committed steps."""
    root = Path(root)
    for r in roles:
        if not (step_dir(root / r, step) / "state.json").is_file():
            raise CheckpointError(f"cannot commit step {step}: role {r!r} has no complete checkpoint at "
                                  f"{step_dir(root / r, step)}")
    prev = last_commit(root)
    kept = sorted(set((prev or {}).get("kept", [])) | {step})
    kept = [s for s in kept if s <= step][-max(keep, 1):]
    _atomic_write_text(root / COMMIT_FILE, json.dumps({"step": step, "roles": list(roles), "kept": kept}) + "\n")
    for r in roles:
        for p in (root / r).iterdir():
            # Uncommitted or superseded steps, and temporary directories a crash left behind.
            stale = (p.name.startswith("step_") and int(p.name[5:]) not in kept) or p.name.startswith(".step_")
            if p.is_dir() and stale:
                shutil.rmtree(p, ignore_errors=True)


def last_commit(root: str | Path) -> dict[str, Any] | None:
    """The newest multi-role commit under ``root`` (``{"step", "roles", "kept"}``), or None."""
    p = Path(root) / COMMIT_FILE
    if not p.is_file():
        return None
    c = json.loads(p.read_text())
    for r in c["roles"]:
        d = step_dir(Path(root) / r, c["step"])
        if not (d / "state.json").is_file():
            raise CheckpointError(f"{p} commits step {c['step']}, but {d} is not a complete checkpoint; "
                                  "the run directory was changed after the commit")
    return c
