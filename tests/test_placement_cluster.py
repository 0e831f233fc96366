"""Placement on a simulated 2-node cluster with logical GPUs (ray.cluster_utils.Cluster)."""
import time

import pytest

from rayalign.cluster import placement
from rayalign.cluster.group import ActorGroup
from rayalign.cluster.worker import Worker
from rayalign.config import GroupConfig

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, logging_level="warning", configure_logging=True)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def wait_idle(timeout=30):
    import ray

    total = ray.cluster_resources()
    deadline = time.time() + timeout
    while time.time() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0) >= total[k] for k in ("CPU", "GPU")):
            return
        time.sleep(0.2)
    raise AssertionError(f"resources not released: {ray.available_resources()}")


def run_roles(roles):
    wait_idle()
    pools = placement.place(roles)
    groups = {}
    try:
        for name, cfg in roles.items():
            groups[name] = ActorGroup(name, Worker, cfg, pools, roles=roles)  # no model: just where ranks land
        return {name: g.node_info() for name, g in groups.items()}, pools
    finally:
        for g in groups.values():
            g.kill()
        placement.release(pools.values())


def test_pack_keeps_a_group_on_one_node(two_nodes):
    got, _ = run_roles({"policy": GroupConfig(workers=2, cpus_per_worker=1, gpus_per_worker=1)})
    assert len({w["node_id"] for w in got["policy"]}) == 1
    assert sorted(w["gpu_ids"][0] for w in got["policy"]) == ["0", "1"]  # one GPU each


def test_spread_spreads(two_nodes):
    got, _ = run_roles({"policy": GroupConfig(workers=2, cpus_per_worker=1, gpus_per_worker=1,
                                              placement="SPREAD")})
    assert len({w["node_id"] for w in got["policy"]}) == 2


def test_colocated_roles_share_bundles(two_nodes):
    roles = {"policy": GroupConfig(workers=2, cpus_per_worker=1, gpus_per_worker=1, placement="SPREAD"),
             "reference": GroupConfig(workers=2, cpus_per_worker=1, gpus_per_worker=1,
                                      colocate_with="policy")}
    got, pools = run_roles(roles)
    assert list(pools) == ["policy"]
    for rank in range(2):
        p, r = got["policy"][rank], got["reference"][rank]
        assert p["node_id"] == r["node_id"] and p["gpu_ids"] == r["gpu_ids"]  # same bundle, same GPU
    assert got["policy"][0]["node_id"] != got["policy"][1]["node_id"]


def test_impossible_layout_fails_fast(two_nodes):
    t = time.time()
    with pytest.raises(placement.PlacementError, match="no node offers one bundle"):
        placement.place({"policy": GroupConfig(workers=1, gpus_per_worker=3)})
    with pytest.raises(placement.PlacementError, match="STRICT_PACK"):
        placement.place({"policy": GroupConfig(workers=3, gpus_per_worker=1, placement="STRICT_PACK")})
    with pytest.raises(placement.PlacementError, match="do not fit"):
        placement.place({"policy": GroupConfig(workers=5, gpus_per_worker=1)})
    assert time.time() - t < 10


def test_busy_cluster_times_out_with_a_reason(two_nodes):
    held = placement.place({"other": GroupConfig(workers=2, cpus_per_worker=2, placement="SPREAD")})
    try:
        with pytest.raises(placement.PlacementError, match="not placed within 2s"):
            placement.place({"policy": GroupConfig(workers=1, cpus_per_worker=1, ready_timeout_s=2)})
    finally:
        placement.release(held.values())
