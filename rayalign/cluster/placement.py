"""Placement: roles → resource pools → Ray placement groups.

Each role asks for ``workers`` bundles of ``{CPU: c, GPU: g}``. Roles that name
``colocate_with`` share the bundles of the role they name (verl's resource pools):
a pool reserves, per bundle, the largest request among its roles, and each role's
actors take a fraction of it, so the two roles' rank *i* land on the same bundle.

Before anything is reserved the layout is checked against the nodes Ray knows, so an
impossible layout fails at once with a reason instead of hanging in a pending
placement group.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..config import GroupConfig
from ..errors import RayalignError


class PlacementError(RayalignError, RuntimeError):
    pass


@dataclass
class Pool:
    name: str
    roles: list[str]
    workers: int
    bundle: dict[str, float]
    strategy: str
    pg: Any = None
    bundle_order: list[int] = field(default_factory=list)  # rank i -> bundle index
    bundle_nodes: list[str] = field(default_factory=list)  # by bundle index


def role_shares(roles: dict[str, GroupConfig]) -> dict[str, tuple[str, dict[str, float]]]:
    """For each role: its pool name and the resources each of its actors requests."""
    pools: dict[str, list[str]] = {}
    for name, g in roles.items():
        root = name
        hops = 0
        while roles[root].colocate_with:
            nxt = roles[root].colocate_with
            if nxt not in roles:
                raise PlacementError(f"role {root!r}: colocate_with names unknown role {nxt!r}")
            root = nxt
            hops += 1
            if hops > len(roles):
                raise PlacementError(f"role {name!r}: colocate_with forms a cycle")
        pools.setdefault(root, []).append(name)
    out = {}
    for root, members in pools.items():
        sizes = {roles[m].workers for m in members}
        if len(sizes) != 1:
            raise PlacementError(
                f"colocated roles {members} must have the same number of workers, got "
                + ", ".join(f"{m}={roles[m].workers}" for m in members)
            )
        n = len(members)
        for m in members:
            g = roles[m]
            # Each colocated actor takes an equal slice of the shared bundle.
            out[m] = (root, {"CPU": g.cpus_per_worker / n if n > 1 else g.cpus_per_worker,
                             "GPU": g.gpus_per_worker / n if n > 1 else g.gpus_per_worker})
    return out


def plan_pools(roles: dict[str, GroupConfig]) -> dict[str, Pool]:
    shares = role_shares(roles)
    pools: dict[str, Pool] = {}
    for role, (root, _) in shares.items():
        g = roles[role]
        pool = pools.setdefault(root, Pool(root, [], g.workers, {"CPU": 0.0, "GPU": 0.0},
                                           roles[root].placement))
        pool.roles.append(role)
        pool.bundle["CPU"] = max(pool.bundle["CPU"], g.cpus_per_worker)
        pool.bundle["GPU"] = max(pool.bundle["GPU"], g.gpus_per_worker)
    for pool in pools.values():
        pool.bundle = {k: v for k, v in pool.bundle.items() if v > 0}
    return pools


def _fits(free: dict[str, float], need: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def check_feasible(pools: list[Pool], nodes: list[dict[str, float]]) -> None:
    """First-fit the bundles onto the nodes' total resources; raise with a reason if they
    cannot fit whatever else is running."""
    if not nodes:
        raise PlacementError("the Ray cluster reports no alive nodes")
    free = [dict(n) for n in nodes]
    for pool in sorted(pools, key=lambda p: -p.workers * sum(p.bundle.values())):
        need = pool.bundle
        desc = f"pool {pool.name!r} (roles {', '.join(pool.roles)}): {pool.workers} x {need}"
        biggest = max(free, key=lambda n: n.get("GPU", 0) * 1000 + n.get("CPU", 0))
        if not any(_fits(n, need) for n in free):
            raise PlacementError(
                f"cannot place {desc}: no node offers one bundle; largest node has "
                f"{ {k: biggest.get(k, 0) for k in need} }"
            )
        if pool.strategy == "STRICT_PACK":
            total = {k: v * pool.workers for k, v in need.items()}
            cand = [n for n in free if _fits(n, total)]
            if not cand:
                raise PlacementError(f"cannot place {desc} with STRICT_PACK: no single node has {total}")
            for k, v in total.items():
                cand[0][k] -= v
            continue
        if pool.strategy == "STRICT_SPREAD":
            cand = [n for n in free if _fits(n, need)]
            if len(cand) < pool.workers:
                raise PlacementError(
                    f"cannot place {desc} with STRICT_SPREAD: needs {pool.workers} nodes, "
                    f"only {len(cand)} can hold a bundle"
                )
            for n in cand[: pool.workers]:
                for k, v in need.items():
                    n[k] -= v
            continue
        for _ in range(pool.workers):
            n = next((n for n in free if _fits(n, need)), None)
            if n is None:
                total = {k: sum(x.get(k, 0) for x in nodes) for k in need}
                raise PlacementError(
                    f"cannot place {desc}: the cluster has {total} in all, and the bundles do "
                    "not fit beside the other roles"
                )
            for k, v in need.items():
                n[k] -= v


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def reserve(pool: Pool, timeout_s: float) -> Pool:
    """Create the pool's placement group and order its bundles by node."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    pg = placement_group([dict(pool.bundle) for _ in range(pool.workers)], strategy=pool.strategy,
                         name=f"rayalign-{pool.name}-{int(time.time() * 1000) % 10**8}")
    ready = pg.ready()
    done, _ = ray.wait([ready], timeout=timeout_s)
    if not done:
        remove_placement_group(pg)
        raise PlacementError(
            f"pool {pool.name!r}: {pool.workers} x {pool.bundle} ({pool.strategy}) not placed within "
            f"{timeout_s:.0f}s; other jobs may hold the resources (see `ray status`)"
        )
    table = placement_group_table(pg)
    b2n = table.get("bundles_to_node_id", {})
    pool.bundle_nodes = [b2n.get(i, "") for i in range(pool.workers)]
    # Ranks on one node stay contiguous, nodes in order of first appearance: keeps
    # intra-node neighbours adjacent for ring collectives.
    first: dict[str, int] = {}
    for i, n in enumerate(pool.bundle_nodes):
        first.setdefault(n, i)
    pool.bundle_order = sorted(range(pool.workers), key=lambda i: (first[pool.bundle_nodes[i]], i))
    pool.pg = pg
    return pool


def place(roles: dict[str, GroupConfig], timeout_s: float | None = None) -> dict[str, Pool]:
    """Check and reserve every pool for these roles. Returns pools by name."""
    pools = plan_pools(roles)
    check_feasible(list(pools.values()), cluster_nodes())
    reserved: list[Pool] = []
    try:
        for pool in pools.values():
            t = timeout_s or max(roles[r].ready_timeout_s for r in pool.roles)
            reserved.append(reserve(pool, t))
    except Exception:
        release(reserved)
        raise
    return pools


def release(pools) -> None:
    from ray.util.placement_group import remove_placement_group

    for pool in pools:
        if pool.pg is not None:
            try:
                remove_placement_group(pool.pg)
            except Exception:
                pass
            pool.pg = None
