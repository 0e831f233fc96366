"""Cluster plumbing: the Ray session, placement and actor groups."""
from __future__ import annotations

import contextlib
import os

from ..config import ClusterConfig
from .procs import descendants, is_ray_process, restore_stop_handlers, stop_all


@contextlib.contextmanager
def ray_session(cfg: ClusterConfig):
    """Join ``cfg.address`` / ``RAY_ADDRESS`` when given, else start an embedded local Ray.

    A Ray that is already initialised (tests, notebooks) is reused and left running.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    before: set[int] | None = None  # an embedded Ray: the processes already here
    env_vars = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RAYALIGN_CACHE", "XDG_CACHE_HOME", "PYTHONPATH"):
        if os.environ.get(key):
            env_vars[key] = os.environ[key]
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A submitted job (`rayalign submit`): its runtime env (working dir, shipped code,
        # these variables) already reaches every actor; a second one here would conflict.
        ray.init(address=address or "auto", log_to_driver=True)
    elif address:
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        before = set(descendants(os.getpid()))
        # address="local": a new embedded Ray even when another local cluster runs on this
        # machine (`ray start`, a test's head node), which ray.init() would otherwise join
        # and then refuse the CPU count for.
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), num_gpus=cfg.num_gpus,
                 include_dashboard=False, object_store_memory=cfg.object_store_memory_mb * 2**20,
                 runtime_env={"env_vars": env_vars}, log_to_driver=True,
                 configure_logging=True, logging_level="warning")
    restore_stop_handlers()
    try:
        yield
    finally:
        shutdown(before)


def shutdown(before: set[int] | None) -> None:
    """Stop Ray; for an embedded one (``before``: the processes this one had already
    started), also every Ray process it started. ``ray.shutdown()`` leaves
    ``DashboardAgent`` and ``RuntimeEnvAgent`` running (they ignore SIGTERM and are
    re-parented once the raylet is gone): they are found before and killed after."""
    import ray

    ours = [] if before is None else [p for p in descendants(os.getpid()) if p not in before and is_ray_process(p)]
    ray.shutdown()
    stop_all(ours, grace_s=5.0)
