"""What every pipeline stage does the same way: run directories, resume points, step
counts, and a role's actor group for the length of a block."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import checkpoint
from ..cluster import placement
from ..cluster.group import ActorGroup
from ..config import Config, ConfigError, GroupConfig, TrainConfig, dump_config
from ..errors import RayalignError
from ..tracking import new_run_dir


class Cadence:
    """When a training loop checkpoints: every ``every`` steps and at least every ``minutes``
    (either 0: off), never at the last step (the caller's final save)."""

    def __init__(self, every: int, minutes: float):
        self.every, self.minutes, self.last = every, minutes, time.time()

    def due(self, done: int, total: int) -> bool:
        if done >= total:
            return False
        hit = bool(self.every and done % self.every == 0) or bool(
            self.minutes and time.time() - self.last >= self.minutes * 60)
        if hit:
            self.last = time.time()
        return hit


def say(msg: str) -> None:
    print(f"[rayalign] {msg}", file=sys.stderr, flush=True)


class RecoveryError(RayalignError, RuntimeError):
    """A stage that lost actors more often than ``cluster.max_failures`` allows."""


def failure_limit(cfg: Config, stage: str, command: str, run_dir: Path, failures: int, exc: BaseException) -> str:
    """What failed, in one line; past ``cluster.max_failures`` a :class:`RecoveryError`
    with the command that continues the run."""
    what = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    limit = cfg.cluster.max_failures
    if failures >= limit:
        raise RecoveryError(
            f"{stage} stopped: {what}. That is failure {failures + 1}, past cluster.max_failures ({limit}). "
            f"Continue from the last checkpoint with: rayalign {command} CONFIG --resume {run_dir}") from exc
    return what


def recovering(cfg: Config, stage: str, command: str, run: Callable[[Path, bool], dict[str, Any]],
               run_dir: Path | None, resume: bool) -> dict[str, Any]:
    """``run(run_dir, resume)``, a stage whose roles can be lost. After a lost actor, node or
    unanswered call (not a bug or bad input: those end the run) the stage runs again from
    its own last checkpoint or finished chunk, up to ``cluster.max_failures`` times. Each
    failure is printed, logged as a ``<stage>_recovery`` metrics row and listed in the
    stage's summary."""
    from ..cluster.group import lost_actor
    from ..tracking import Tracker, write_summary

    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg, stage)
    failures: list[dict[str, Any]] = []
    while True:
        try:
            out = run(run_dir, resume)
            break
        except Exception as exc:
            if isinstance(exc, RecoveryError) or not lost_actor(exc):
                raise
            what = failure_limit(cfg, stage, command, run_dir, len(failures), exc)
            failures.append({"failure": len(failures) + 1, "what": what, "detected_at": time.time(),
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            tr = Tracker(run_dir, cfg.tracking.model_copy(update={"wandb": "disabled"}))
            tr.log(f"{stage}_recovery", len(failures), failures[-1])
            tr.close()
            say(f"{stage}: failure {len(failures)} of at most {cfg.cluster.max_failures}: {what}. Starting the "
                "stage again from its last checkpoint or finished chunk")
            resume = True
    if failures:
        out = dict(out, recoveries=failures)
        path = run_dir / "summary.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        write_summary(run_dir, {stage: dict(old.get(stage) or {}, recoveries=failures)}, cfg.name)
    return out


def prepare_run_dir(cfg: Config, run_dir: Path | None, command: str, resume: bool) -> Path:
    """The run directory with the resolved config written into it (a run resumed with other
    settings adds ``config.resumed.yaml`` and keeps the original)."""
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg, command)
    run_dir.mkdir(parents=True, exist_ok=True)
    text, first = dump_config(cfg), run_dir / "config.yaml"
    if not (resume and first.exists()):
        first.write_text(text)
    elif first.read_text() != text:  # a resume with other settings: keep both
        (run_dir / "config.resumed.yaml").write_text(text)
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


class Layout:
    """The roles one stage may start, and how they share bundles: a role that names
    ``colocate_with`` and the role it names form one pool (one placement group; each role's
    rank *i* takes its slice of bundle *i*), the layout ``rayalign plan`` checks. A pool is
    reserved when the first of its roles starts and given back when the last one stops, so
    roles that never run together still never hold resources together."""

    def __init__(self, roles: dict[str, GroupConfig]):
        self.roles = dict(roles)
        self.shares = placement.role_shares(self.roles)  # refuses unknown names and cycles
        self.planned = placement.plan_pools(self.roles)
        self.placed: dict[str, placement.Pool] = {}
        self.users: dict[str, int] = {}

    def acquire(self, role: str) -> dict[str, placement.Pool]:
        name = self.shares[role][0]
        if name not in self.placed:
            pool = self.planned[name]
            placement.check_feasible([pool], placement.cluster_nodes())
            t = max(self.roles[r].ready_timeout_s for r in pool.roles)
            self.placed[name] = placement.reserve(pool, t)
        self.users[name] = self.users.get(name, 0) + 1
        return self.placed

    def release(self, role: str) -> None:
        name = self.shares[role][0]
        self.users[name] -= 1
        if self.users[name] <= 0 and name in self.placed:
            placement.release([self.placed.pop(name)])

    def close(self) -> None:
        placement.release(list(self.placed.values()))
        self.placed.clear()


_layout: Layout | None = None


def record_placement(run_dir: Path, groups: dict[str, ActorGroup]) -> dict:
    """Where each role's ranks run (node, placement group, bundle), written to
    ``RUN/placement.json``: what a user checks when colocation or spreading matters."""
    import json

    out = {role: [dict(info, bundle=b) for info, b in zip(g.node_info(), g.bundles)]
           for role, g in groups.items() if g is not None}
    (Path(run_dir) / "placement.json").write_text(json.dumps(out, indent=1))
    return out


@contextlib.contextmanager
def stage_layout(cfg: Config, phase: str) -> Iterator[Layout]:
    """Within the block, the roles of ``phase`` (as ``rayalign plan`` lists them) are placed by
    one :class:`Layout`, so ``colocate_with`` between them takes effect."""
    from ..cluster.plan import roles_of

    global _layout
    roles = {lo.role: lo.group for lo in roles_of(cfg, allow_empty=True) if lo.phase == phase}
    try:
        lay = Layout(roles)
    except placement.PlacementError as exc:
        raise ConfigError(f"{phase}: {exc}") from None
    prev, _layout = _layout, lay
    try:
        yield lay
    finally:
        _layout = prev
        lay.close()


@contextlib.contextmanager
def role_group(role: str, worker_cls: type, group: GroupConfig, timeout_s: float | None = None
               ) -> Iterator[ActorGroup]:
    """Place a role (in its stage's layout, sharing bundles with the roles it is colocated
    with), start its ranks, and give everything back when the block ends.
    ``timeout_s``: how long any call of the group may take to answer (default: the role's
    ``call_timeout_s``)."""
    lay = _layout if _layout is not None and _layout.roles.get(role) == group else None
    if lay is None:
        if group.colocate_with:
            raise ConfigError(f"role {role!r}: colocate_with {group.colocate_with!r} names no role that this "
                              "stage starts with it (`rayalign plan CONFIG` lists each stage's roles)")
        lay = Layout({role: group})
    pools = lay.acquire(role)
    grp = None
    try:
        grp = ActorGroup(role, worker_cls, group, pools, roles=lay.roles,
                         timeout_s=group.call_timeout_s if timeout_s is None else timeout_s)
        yield grp
    finally:
        if grp is not None:
            grp.kill()
        lay.release(role)
        if lay is not _layout:
            lay.close()
