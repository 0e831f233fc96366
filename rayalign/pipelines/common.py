"""What every pipeline stage does the same way: run directories, resume points, step
counts, and a role's actor group for the length of a block."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

from .. import checkpoint
from ..cluster import placement
from ..cluster.group import ActorGroup
from ..config import Config, ConfigError, GroupConfig, TrainConfig, dump_config
from ..tracking import new_run_dir


def say(msg: str) -> None:
    print(f"[rayalign] {msg}", file=sys.stderr, flush=True)


def prepare_run_dir(cfg: Config, run_dir: Path | None, command: str, resume: bool) -> Path:
    """The run directory with the resolved config written into it (a resumed run adds
    ``config.resumed.yaml`` and keeps the original)."""
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg, command)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "config.resumed.yaml" if resume and (run_dir / "config.yaml").exists() else "config.yaml"
    (run_dir / name).write_text(dump_config(cfg))
    return run_dir


def checkpoint_root(cfg: Config, run_dir: Path) -> str:
    """Where a run's checkpoints go: ``tracking.checkpoint_root/<run name>`` (any fsspec URI)
    when set, else ``RUN_DIR/checkpoints``."""
    base = cfg.tracking.checkpoint_root
    return checkpoint.join(base, Path(run_dir).name) if base else str(Path(run_dir) / "checkpoints")


def resume_point(ckpt_root: str, resume: bool) -> tuple[str | None, int]:
    ck = checkpoint.latest(ckpt_root) if resume else None
    return ck, (checkpoint.read_state(ck)["trainer"]["step"] if ck else 0)


def plan_steps(section: str, n_examples: int, group: GroupConfig, train: TrainConfig) -> int:
    """Optimizer steps for this data and batch layout, or a ConfigError naming the keys."""
    if train.batch_size % (group.workers * train.micro_batch_size):
        raise ConfigError(
            f"{section}.train.batch_size ({train.batch_size}) must be a multiple of {section}.group.workers x "
            f"{section}.train.micro_batch_size ({group.workers} x {train.micro_batch_size})")
    per_epoch = n_examples // train.batch_size
    if per_epoch == 0:
        raise ConfigError(f"{section}.train.batch_size ({train.batch_size}) exceeds the {n_examples} "
                          "training examples")
    total = per_epoch * train.epochs
    return min(total, train.max_steps) if train.max_steps else total


@contextlib.contextmanager
def role_group(role: str, worker_cls: type, group: GroupConfig, timeout_s: float | None = None
               ) -> Iterator[ActorGroup]:
    """Place a role, start its ranks, and give everything back when the block ends.
    ``timeout_s``: how long any call of the group may take to answer."""
    pools = placement.place({role: group})
    grp = None
    try:
        grp = ActorGroup(role, worker_cls, group, pools, timeout_s=timeout_s)
        yield grp
    finally:
        if grp is not None:
            grp.kill()
        placement.release(pools.values())
