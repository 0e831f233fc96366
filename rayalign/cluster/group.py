"""One actor-group abstraction for every role.

``ActorGroup`` hosts N ranks of a :class:`~rayalign.cluster.worker.Worker` subclass
as Ray actors on a reserved pool, joins them into one process group, and lets the
driver call the group like one object::

    policy = ActorGroup("policy", PolicyWorker, cfg.group, pools)
    stats = policy.train_step(batch)      # split across ranks, gathered back

``LocalGroup`` is the same interface over one in-process worker (no Ray), used by
the GPU check and by unit tests.
"""
from __future__ import annotations

import os
from pathlib import Path

from typing import Any, Iterator, Sequence

from ..config import GroupConfig
from ..batch import TRAFFIC, split_sizes
from .placement import Pool, role_shares
from .worker import ALL, EACH, SPLIT, Worker


class GroupError(RuntimeError):
    pass


class LostRankError(GroupError):
    """A rank died or did not answer within its timeout: restarting the role can help.
    ``role``: the group it belongs to."""

    def __init__(self, msg: str, role: str | None = None):
        super().__init__(msg)
        self.role = role


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """An error and each one it was raised from (cycles cut)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def failed_role(exc: BaseException) -> str | None:
    """The role whose rank was lost, where the error (or one it was raised from) says."""
    return next((e.role for e in _chain(exc) if isinstance(e, LostRankError)), None)


def lost_actor(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a lost actor, node or object: what a
    restart of the roles from the last checkpoint recovers, unlike a bug or bad input."""
    try:
        import ray.exceptions as rex
    except ImportError:
        return isinstance(exc, LostRankError)
    lost = (LostRankError, rex.RayActorError, rex.ObjectLostError, rex.OwnerDiedError, rex.NodeDiedError,
            rex.GetTimeoutError)
    return any(isinstance(e, lost) or (isinstance(e, rex.RayTaskError) and isinstance(getattr(e, "cause", None), lost))
               for e in _chain(exc))


def split_list(items: Sequence, n: int) -> list[list]:
    """Contiguous chunks whose sizes differ by at most one (earlier chunks larger)."""
    items = list(items)
    out, start = [], 0
    for k in split_sizes(len(items), n):
        out.append(items[start:start + k])
        start += k
    return out


def merge(results: list[Any]) -> Any:
    """Concatenate per-rank results of a SPLIT call in rank order."""
    first = results[0]
    if isinstance(first, list):
        return [x for r in results for x in r]
    if isinstance(first, dict):
        return {k: merge([r[k] for r in results]) for k in first}
    try:
        import torch

        if torch.is_tensor(first):
            return torch.cat(results, dim=0)
    except ImportError:
        pass
    return results


def cpu_allocator_env() -> dict[str, str]:
    """Run CPU ranks on jemalloc (shipped inside Ray's wheel), keeping freed pages a while.

    Every forward/backward allocates and frees hundreds of MB of activations and logits.
    glibc hands such blocks back to the kernel at once, so the next call page-faults them
    in again: measured ~1 s of kernel time per SmolLM2 PPO update, up to 2.5 s once a
    second model's process has churned memory too. jemalloc keeps freed
    pages for 30 s: a step (or a PPO phase) reuses them, and pages no longer used are given
    back. With decay off altogether (never given back), an Aligner rank grew by ~0.3 GB a
    step to an OOM kill at 21 GB, where glibc stayed at ~4 GB. Opt out with
    RAYALIGN_JEMALLOC=0; RAYALIGN_MALLOC_CONF replaces the jemalloc settings.
    """
    if os.environ.get("RAYALIGN_JEMALLOC", "1") == "0":
        return {}
    try:
        import ray

        lib = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    except ImportError:
        return {}
    if not lib.is_file():
        return {}
    conf = os.environ.get("RAYALIGN_MALLOC_CONF", "dirty_decay_ms:30000,muzzy_decay_ms:30000")
    return {"LD_PRELOAD": str(lib), "MALLOC_CONF": conf}


def _method_mode(worker_cls: type, name: str) -> str:
    fn = getattr(worker_cls, name, None)
    mode = getattr(fn, "_rayalign_dispatch", None)
    if fn is None or mode is None:
        raise AttributeError(
            f"{worker_cls.__name__}.{name} is not a group method (declare it with @dispatch)"
        )
    return mode


def _returns_rows(worker_cls: type, name: str, args: tuple) -> bool:
    """A split call given a Rows handle whose method declares per-row output."""
    from ..batch import Rows

    return bool(args) and isinstance(args[0], Rows) and getattr(getattr(worker_cls, name), "_rayalign_out", None)


def _rows_of(metas: list[dict], batches: list):
    """Rows over the ranks' answers, in rank order."""
    from ..batch import Rows

    complete = set(metas[0]["complete"]).intersection(*(m["complete"] for m in metas))
    return Rows(tuple((b, m["rows"]) for m, b in zip(metas, batches)),
                complete=tuple(k for k in metas[0]["complete"] if k in complete))


class Pending:
    """A group call in flight (or, in process, already done)."""

    def __init__(self, finish, eager: bool = False):
        self._finish, self._done, self._value = finish, False, None
        if eager:
            self.result()

    def result(self):
        if not self._done:
            self._value, self._done = self._finish(), True
        return self._value


class _GroupBase:
    worker_cls: type
    name: str

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        mode = _method_mode(self.worker_cls, attr)
        return lambda *a, **k: self._call(attr, mode, a, k)

    def submit(self, method: str, *args, **kwargs) -> "Pending":
        """Start a group call without waiting for it: ``.result()`` waits. Calls on
        different groups run at the same time (their roles are separate processes)."""
        return self._submit(method, _method_mode(self.worker_cls, method), args, kwargs)

    def _submit(self, name: str, mode: str, args: tuple, kwargs: dict) -> "Pending":
        return Pending(lambda: self._call(name, mode, args, kwargs), eager=True)

    def map(self, method: str, items: Sequence, *args, **kwargs) -> list:
        """A split call over any number of items. Every rank must get work (a ZeRO-3 group's
        forwards are collective), so the list is padded with its first item up to a
        multiple of the world size; the padding's answers are dropped."""
        if _method_mode(self.worker_cls, method) != SPLIT:
            raise GroupError(f"{self.name}.{method} is not a split call")
        items = list(items)
        if not items:
            return []
        pad = (-len(items)) % self.world_size
        return getattr(self, method)(items + items[:1] * pad, *args, **kwargs)[:len(items)]

    def _split_args(self, name: str, args: tuple, n: int) -> list[tuple]:
        from ..batch import Rows

        if args and isinstance(args[0], Rows):
            if len(args[0]) < n:
                raise GroupError(f"{self.name}.{name}: {len(args[0])} rows cannot be split over {n} ranks")
            return [(part,) + tuple(args[1:]) for part in args[0].split(n)]
        if not args or not isinstance(args[0], (list, tuple)):
            raise GroupError(f"{self.name}.{name}: a split call needs a list as first argument")
        if len(args[0]) < n:
            raise GroupError(f"{self.name}.{name}: {len(args[0])} items cannot be split over {n} ranks")
        return [(chunk,) + tuple(args[1:]) for chunk in split_list(args[0], n)]


class ActorGroup(_GroupBase):
    def __init__(self, name: str, worker_cls: type[Worker], cfg: GroupConfig,
                 pools: dict[str, Pool], roles: dict[str, GroupConfig] | None = None,
                 env: dict[str, str] | None = None, timeout_s: float | None = None, **worker_kwargs):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name, self.worker_cls, self.cfg = name, worker_cls, cfg
        self.timeout_s = timeout_s  # for every call's answer; None waits as long as the call runs
        roles = roles or {name: cfg}
        pool_name, share = role_shares(roles)[name]
        pool = pools[pool_name]
        if pool.pg is None:
            raise GroupError(f"{name}: pool {pool_name!r} holds no placement group")
        threads = cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker))
        env = dict(env or {})
        env.setdefault("OMP_NUM_THREADS", str(threads))
        if cfg.gpus_per_worker == 0:
            env.setdefault("DS_ACCELERATOR", "cpu")
            env.update({k: v for k, v in cpu_allocator_env().items() if k not in env})
        remote = ray.remote(worker_cls)
        self.actors = []
        for rank in range(cfg.workers):
            bundle = pool.bundle_order[rank]
            opts = dict(
                num_cpus=share["CPU"], num_gpus=share["GPU"],
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pool.pg, placement_group_bundle_index=bundle,
                    placement_group_capture_child_tasks=False,
                ),
                runtime_env={"env_vars": env},
                max_concurrency=1,
            )
            self.actors.append(remote.options(**opts).remote(
                rank, cfg.workers, threads, cfg.backend, env, **worker_kwargs))
        self.bundles = [pool.bundle_order[r] for r in range(cfg.workers)]
        # Rank 0's node publishes the rendezvous; every rank then joins one process group.
        try:
            addr, port = ray.get(self.actors[0].master_endpoint.remote())
            ray.get([a.init_distributed.remote(addr, port) for a in self.actors])
        except BaseException:
            self.kill()  # never leave half a group holding its resources
            raise

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def _call(self, name: str, mode: str, args: tuple, kwargs: dict):
        return self._submit(name, mode, args, kwargs).result()

    def _submit(self, name: str, mode: str, args: tuple, kwargs: dict) -> Pending:
        TRAFFIC.sent((args, kwargs), f"{self.name}.{name}")
        if mode == SPLIT:
            parts = self._split_args(name, args, len(self.actors))
            if _returns_rows(self.worker_cls, name, args):
                # The answers stay in the object store: the driver waits on each rank's small
                # meta and hands on a Rows over the batches.
                pairs = [getattr(a, name).options(num_returns=2).remote(*sa, **kwargs)
                         for a, sa in zip(self.actors, parts)]
                return Pending(lambda: _rows_of(self._get([m for m, _ in pairs], name), [b for _, b in pairs]))
            refs = [getattr(a, name).remote(*sa, **kwargs) for a, sa in zip(self.actors, parts)]
            return Pending(lambda: merge(self._get(refs, name)))
        refs = [getattr(a, name).remote(*args, **kwargs) for a in self.actors]

        def finish():
            results = self._get(refs, name)
            return results[0] if mode == ALL else results

        return Pending(finish)

    def _get(self, refs: list, method: str) -> list:
        """The ranks' answers; a dead rank or one past the timeout is a GroupError that
        names the role, the rank and the call."""
        import ray

        try:
            out = ray.get(refs, timeout=self.timeout_s)
            TRAFFIC.received(out, f"{self.name}.{method}")
            return out
        except ray.exceptions.GetTimeoutError:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            late = [i for i, r in enumerate(refs) if r not in ready]
            raise LostRankError(f"{self.name}.{method}: rank(s) {late} did not answer within {self.timeout_s:g}s "
                                "(a stopped or overloaded process); the job stops here", self.name) from None
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            # A rank that dies inside a collective makes its peers' calls fail too (the
            # connection to it closes), and ray.get may raise a peer's error first: the call
            # is a lost rank if any rank died, whichever error came first.
            ray.wait(refs, num_returns=len(refs), timeout=30)
            dead = []
            for i, r in enumerate(refs):
                try:
                    ray.get(r, timeout=0)
                except ray.exceptions.RayActorError:
                    dead.append(i)
                except Exception:
                    pass
            if not dead and not isinstance(e, ray.exceptions.RayActorError):
                raise
            raise LostRankError(f"{self.name}.{method}: rank(s) {dead or '?'} died during the call "
                                f"({str(e).splitlines()[0][:200]}); resume the run from its last checkpoint",
                                self.name) from e

    def alive(self, timeout_s: float = 10.0) -> bool:
        """Whether every rank answers a ping within ``timeout_s``."""
        import ray

        try:
            ray.get([a.ping.remote() for a in self.actors], timeout=timeout_s)
            return bool(self.actors)
        except Exception:
            return False

    def kill(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        # Wait until each is really gone, so its resources are free for whatever comes next.
        for a in self.actors:
            try:
                ray.get(a.ping.remote(), timeout=30)
            except Exception:
                pass
        self.actors = []


class LocalGroup(_GroupBase):
    """The group interface over one in-process worker: no Ray, world size 1."""

    def __init__(self, name: str, worker_cls: type[Worker], threads: int | None = None,
                 **worker_kwargs):
        self.name, self.worker_cls = name, worker_cls
        self.worker = worker_cls.local(threads=threads, **worker_kwargs)
        self.bundles = [0]

    @property
    def world_size(self) -> int:
        return 1

    def _call(self, name: str, mode: str, args: tuple, kwargs: dict):
        out = getattr(self.worker, name)(*args, **kwargs)
        if mode == SPLIT and _returns_rows(self.worker_cls, name, args):
            return _rows_of([out[0]], [out[1]])
        return [out] if mode == EACH else out

    def kill(self) -> None:
        self.worker.shutdown()
