"""clusters/: every file parses, carries the fields its format requires, and every config
it references exists and validates."""
import shlex
from pathlib import Path

import pytest
import yaml

from rayalign.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(kind: str) -> list[tuple[Path, dict]]:
    out = []
    for p in sorted(CLUSTERS.rglob("*.yaml")):
        out += [(p, d) for d in docs(p) if isinstance(d, dict) and d.get("kind") == kind]
    return out


def check_entrypoint_config(cmd: str, where: str) -> int:
    """Every config named on a rayalign command line exists (relative to the repo, as the
    image lays it out) and validates with the overrides that follow it."""
    n = 0
    for line in cmd.splitlines():
        argv = shlex.split(line)
        for i, a in enumerate(argv):
            if a.endswith((".yaml", ".yml")) and a.startswith("configs/"):
                path = ROOT / a
                assert path.is_file(), f"{where}: references {a}, which does not exist"
                overrides = [o for o in argv[i + 1:] if "=" in o and not o.startswith("-")]
                load_config(str(path), overrides)
                n += 1
    return n


def pod_containers(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: a container needs name and image"
    return containers


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head, f"{where}: headGroupSpec.rayStartParams is required"
    ports = {p["containerPort"] for c in pod_containers(head["template"], where) for p in c.get("ports", [])}
    assert {6379, 8265} <= ports, f"{where}: the head exposes GCS (6379) and dashboard (8265)"
    groups = spec.get("workerGroupSpecs") or []
    assert groups, f"{where}: no workerGroupSpecs"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    for g in groups:
        assert "rayStartParams" in g, f"{where}/{g['groupName']}: rayStartParams is required"
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas", 2**31)
        assert lo <= n <= hi, f"{where}/{g['groupName']}: minReplicas <= replicas <= maxReplicas"
        pod_containers(g["template"], f"{where}/{g['groupName']}")
    assert spec.get("rayVersion") == __import__("ray").__version__, f"{where}: rayVersion != the pinned Ray"


def test_every_file_parses_and_is_known():
    files = sorted(CLUSTERS.rglob("*.yaml"))
    assert len(files) >= 6
    for p in files:
        assert docs(p), f"{p} is empty"
    kinds = {d.get("kind") for p in files for d in docs(p) if isinstance(d, dict)}
    assert {"RayJob", "RayCluster", "RayService"} <= kinds
    assert (CLUSTERS / "Dockerfile").is_file()


def test_rayjob():
    jobs = by_kind("RayJob")
    assert jobs
    for p, d in jobs:
        assert d["apiVersion"] == "ray.io/v1" and d["metadata"]["name"]
        spec = d["spec"]
        assert spec["entrypoint"].split()[:3] == ["python", "-m", "rayalign.cli"]
        assert "cluster.address=auto" in spec["entrypoint"]
        assert check_entrypoint_config(spec["entrypoint"], str(p)) == 1
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
        check_ray_cluster_spec(spec["rayClusterSpec"], str(p))


def test_raycluster_has_gpu_worker_groups():
    clusters = by_kind("RayCluster")
    assert clusters
    for p, d in clusters:
        assert d["apiVersion"] == "ray.io/v1"
        check_ray_cluster_spec(d["spec"], str(p))
        gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for g in d["spec"]["workerGroupSpecs"]
                for c in g["template"]["spec"]["containers"] if "nvidia.com/gpu" in c["resources"].get("limits", {})]
        assert gpus and all(n >= 1 for n in gpus), f"{p}: no GPU worker group"
        # requests equal limits for GPUs (Kubernetes refuses anything else)
        for g in d["spec"]["workerGroupSpecs"]:
            for c in g["template"]["spec"]["containers"]:
                lim, req = c["resources"].get("limits", {}), c["resources"].get("requests", {})
                if "nvidia.com/gpu" in lim:
                    assert req.get("nvidia.com/gpu") == lim["nvidia.com/gpu"]


def test_rayservice_serves_what_rayalign_serve_deploys():
    from ray.serve.schema import ServeDeploySchema

    from rayalign.serve.app import serve_config

    services = by_kind("RayService")
    assert services
    for p, d in services:
        check_ray_cluster_spec(d["spec"]["rayClusterConfig"], str(p))
        doc = yaml.safe_load(d["spec"]["serveConfigV2"])
        ServeDeploySchema.model_validate(doc)
        app = doc["applications"][0]
        assert app["import_path"] == "rayalign.serve.app:app_builder"
        cfg = load_config(str(ROOT / "configs" / "aligner.yaml"), ["serve.host=0.0.0.0"])
        assert doc == serve_config(cfg.serve, app["args"]["checkpoint"]), \
            f"{p}: serveConfigV2 differs from `rayalign serve --config configs/aligner.yaml --write-config`"
        # the checkpoint path is a volume the worker pods mount
        mounts = {m["mountPath"] for g in d["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                  for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert app["args"]["checkpoint"] in mounts


def test_ray_up_config_validates_against_the_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = CLUSTERS / "ray-up-gpu.yaml"
    d = yaml.safe_load(path.read_text())
    validate_config(prepare_config(d))
    assert d["head_node_type"] in d["available_node_types"]
    for local in d.get("file_mounts", {}).values():
        assert (ROOT / local).exists(), f"file_mounts source {local} missing"
    bad = dict(d, max_workers="many")
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    from rayalign import jobs

    doc = yaml.safe_load((CLUSTERS / "runtime_env.yaml").read_text())
    RuntimeEnv(**doc)
    assert doc["working_dir"] == "."
    assert {".venv", ".git", "runs"} <= set(doc["excludes"])
    # `rayalign submit --runtime-env` merges it with its own settings
    rt = jobs.runtime_env(ROOT, jobs.load_runtime_env(str(CLUSTERS / "runtime_env.yaml")), {"X": "1"}, True)
    RuntimeEnv(**rt)
    assert rt["env_vars"]["RAYALIGN_CACHE"] == doc["env_vars"]["RAYALIGN_CACHE"] and rt["env_vars"]["X"] == "1"
    assert rt["working_dir"] == str(ROOT)


def test_comments_say_what_to_change():
    for p in sorted(CLUSTERS.rglob("*")):
        if p.is_file():
            assert "CHANGE" in p.read_text(), f"{p} does not mark what to edit"


def test_gpu_config_fits_the_shipped_cluster_spec():
    from rayalign.cluster.plan import make_plan

    plan = make_plan(load_config(str(ROOT / "configs" / "quickstart_gpu.yaml")),
                     str(CLUSTERS / "plan-1x8xh100.yaml"))
    assert plan["ok"], plan["problems"]
