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

from typing import Any, Sequence

from ..config import GroupConfig
from .placement import Pool, role_shares
from .worker import ALL, EACH, SPLIT, Worker


class GroupError(RuntimeError):
    pass


def split_list(items: Sequence, n: int) -> list[list]:
    """Contiguous chunks whose sizes differ by at most one (earlier chunks larger)."""
    items = list(items)
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        k = q + (1 if i < r else 0)
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


def _method_mode(worker_cls: type, name: str) -> str:
    fn = getattr(worker_cls, name, None)
    mode = getattr(fn, "_rayalign_dispatch", None)
    if fn is None or mode is None:
        raise AttributeError(
            f"{worker_cls.__name__}.{name} is not a group method (declare it with @dispatch)"
        )
    return mode


class _GroupBase:
    worker_cls: type
    name: str

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        mode = _method_mode(self.worker_cls, attr)
        return lambda *a, **k: self._call(attr, mode, a, k)

    def _split_args(self, name: str, args: tuple, n: int) -> list[tuple]:
        if not args or not isinstance(args[0], (list, tuple)):
            raise GroupError(f"{self.name}.{name}: a split call needs a list as first argument")
        if len(args[0]) < n:
            raise GroupError(f"{self.name}.{name}: {len(args[0])} items cannot be split over {n} ranks")
        return [(chunk,) + tuple(args[1:]) for chunk in split_list(args[0], n)]


class ActorGroup(_GroupBase):
    def __init__(self, name: str, worker_cls: type[Worker], cfg: GroupConfig,
                 pools: dict[str, Pool], roles: dict[str, GroupConfig] | None = None,
                 env: dict[str, str] | None = None, **worker_kwargs):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name, self.worker_cls, self.cfg = name, worker_cls, cfg
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
        import ray

        if mode == SPLIT:
            refs = [getattr(a, name).remote(*sa, **kwargs)
                    for a, sa in zip(self.actors, self._split_args(name, args, len(self.actors)))]
            return merge(ray.get(refs))
        refs = [getattr(a, name).remote(*args, **kwargs) for a in self.actors]
        results = ray.get(refs)
        return results[0] if mode == ALL else results

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
        return [out] if mode == EACH else out

    def kill(self) -> None:
        self.worker.shutdown()
