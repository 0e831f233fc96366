"""Running rayalign on a Ray cluster through Ray's Job Submission API.

``rayalign submit CONFIG`` validates the config here, uploads the working directory (the
config inside it) and the rayalign package with a runtime environment, and starts
``python -m rayalign.cli COMMAND CONFIG ... cluster.address=auto`` as a job on the
cluster. ``rayalign jobs status|logs|stop|list`` talk to the same API.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .errors import RayalignError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: environments, run outputs, caches, VCS metadata.
EXCLUDES = [".venv", "venv", ".git", "runs", "wandb", "__pycache__", "*.egg-info", ".pytest_cache",
            "*.safetensors", "*.bin", "*.pt", "*.gguf"]
# What every rank needs: offline model hub, quiet tokenizers.
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
PIPELINES = ("run", "sft", "label", "rm", "ppo", "aligner-train", "aligner-build")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobError(RayalignError, RuntimeError):
    pass


def address_of(address: str | None) -> str:
    """The dashboard URL: the option, else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` when
    they name an HTTP address, else the local default."""
    for cand in (address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if cand and cand != "auto":
            return cand if "://" in cand else f"http://{cand}"
    return DEFAULT_ADDRESS


def auth_token() -> str | None:
    """Ray's cluster token as its own tools find it: RAY_AUTH_TOKEN, the file named by
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (written by `ray start` on this machine;
    token authentication is on by default for local clusters since Ray 2.59)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path and Path(path).is_file():
            text = Path(path).read_text().strip()
            if text:
                return text
    return None


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = address_of(address)
    exc: Exception | None = None
    for headers in (None, "token"):
        if headers == "token":  # the dashboard refused us: present the cluster token, if we have one
            token = auth_token()
            if token is None:
                break
            headers = {"Authorization": f"Bearer {token}"}
        try:
            return JobSubmissionClient(url, headers=headers)
        except Exception as e:  # ConnectionError, or a RuntimeError wrapping one
            exc = e
            if "401" not in str(e) and "nauthori" not in str(e):
                break
    unauthorized = exc is not None and ("401" in str(exc) or "nauthori" in str(exc))
    hint = (" The cluster wants Ray's auth token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's "
            "token (`ray get-auth-token` on the head)." if unauthorized else
            " Is the cluster up (`ray start --head`, KubeRay, `ray up`)? Pass --address http://HEAD:8265 or set "
            "RAY_ADDRESS.")
    raise JobError(f"cannot reach the Ray dashboard at {url} ({type(exc).__name__}: {exc}).{hint}") from None


def _default_command(cfg) -> str:
    """The pipeline a config stands for when --command is not given."""
    staged = [name for name in ("sft", "label", "rm", "ppo") if getattr(cfg, name) is not None]
    if cfg.aligner is not None and not staged:
        return "aligner-train"
    if len(staged) == 1:
        return staged[0]
    if staged:
        return "run"
    raise JobError("the config defines no pipeline stage (sft, label, rm, ppo or aligner)")


def runtime_env(working_dir: Path, extra: dict[str, Any] | None, env: dict[str, str],
                ship_package: bool) -> dict[str, Any]:
    """The job's runtime environment: a runtime-env YAML (``--runtime-env``, e.g.
    clusters/runtime_env.yaml) overlaid with the working dir, excludes, variables and
    the local rayalign package."""
    rt = dict(extra or {})
    rt["working_dir"] = str(working_dir)
    rt["excludes"] = sorted(set(rt.get("excludes") or []) | set(EXCLUDES))
    rt["env_vars"] = JOB_ENV | {k: str(v) for k, v in (rt.get("env_vars") or {}).items()} | env
    if ship_package:
        # The code that validated the config is the code that runs it.
        pkg = str(Path(__file__).resolve().parent)
        rt["py_modules"] = list(dict.fromkeys(list(rt.get("py_modules") or []) + [pkg]))
    return rt


def load_runtime_env(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise JobError(f"runtime env {path}: no such file")
    doc = yaml.safe_load(p.read_text()) or {}
    if not isinstance(doc, dict):
        raise JobError(f"runtime env {path}: expected a mapping (working_dir, env_vars, pip, ...)")
    doc.pop("working_dir", None)  # the working directory is --working-dir's
    return doc


def prepare(target: str, overrides: list[str], *, command: str | None = None, working_dir: str | None = None,
            runtime_env_file: str | None = None, env: dict[str, str] | None = None, ship_package: bool = True,
            script_args: str = "") -> dict[str, Any]:
    """Check everything that can be checked here and build the job: entrypoint and runtime
    env. A bad config or a path outside the uploaded directory raises before anything
    is sent."""
    from .config import load_config

    wd = Path(working_dir or ".").resolve()
    if not wd.is_dir():
        raise JobError(f"working directory {wd} does not exist")
    path = Path(target).resolve()
    if not path.is_file():
        raise JobError(f"{target}: no such file")
    try:
        rel = path.relative_to(wd)
    except ValueError:
        raise JobError(f"{target} is outside the working directory {wd} that is uploaded; move it there or "
                       "pass --working-dir") from None
    if path.suffix == ".py":
        entry = ["python", rel.as_posix()] + shlex.split(script_args)
        kind = "script"
    else:
        cfg = load_config(str(path), overrides)  # ConfigError: rejected before submission
        cmd = command or _default_command(cfg)
        if cmd not in PIPELINES:
            raise JobError(f"--command {cmd!r}: one of {', '.join(PIPELINES)}")
        argv = cmd.split("-") if cmd.startswith("aligner") else [cmd]
        if not any(o.startswith("cluster.address=") for o in overrides):
            overrides = list(overrides) + ["cluster.address=auto"]
        entry = ["python", "-m", "rayalign.cli", *argv, rel.as_posix(), *overrides]
        kind = cmd
        if not Path(cfg.tracking.root).is_absolute():
            print(f"rayalign: note: tracking.root is {cfg.tracking.root!r}, relative: run directories land in the "
                  "job's copy of the working directory on the head node. Set tracking.root to a shared path "
                  "(e.g. tracking.root=/mnt/shared/runs) to keep them.", file=sys.stderr)
    rt = runtime_env(wd, load_runtime_env(runtime_env_file), env or {}, ship_package)
    return {"entrypoint": shlex.join(entry), "runtime_env": rt, "kind": kind}


def submit(job: dict[str, Any], address: str | None, submission_id: str | None = None,
           entrypoint_num_cpus: float = 0, entrypoint_num_gpus: float = 0) -> str:
    c = client(address)
    try:
        return c.submit_job(entrypoint=job["entrypoint"], runtime_env=job["runtime_env"],
                            submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
                            entrypoint_num_gpus=entrypoint_num_gpus,
                            metadata={"submitted_by": "rayalign", "kind": job["kind"]})
    except Exception as exc:
        raise JobError(f"the cluster refused the job: {exc}") from None


def _call(address: str | None, method: str, job_id: str):
    c = client(address)
    try:
        return getattr(c, method)(job_id)
    except Exception as exc:
        msg = str(exc)
        if "does not exist" in msg or "404" in msg or "not found" in msg.lower():
            raise JobError(f"no job {job_id!r} on {address_of(address)}") from None
        raise JobError(f"{method} {job_id}: {msg}") from None


def status(address: str | None, job_id: str) -> dict[str, Any]:
    info = _call(address, "get_job_info", job_id)
    return {"job_id": job_id, "status": str(getattr(info.status, "value", info.status)),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time}


def logs(address: str | None, job_id: str) -> str:
    return _call(address, "get_job_logs", job_id)


def stop(address: str | None, job_id: str) -> bool:
    return bool(_call(address, "stop_job", job_id))


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    c = client(address)
    try:
        jobs = c.list_jobs()
    except Exception as exc:
        raise JobError(f"list jobs: {exc}") from None
    return [{"job_id": j.submission_id or j.job_id, "status": str(getattr(j.status, "value", j.status)),
             "entrypoint": j.entrypoint, "start_time": j.start_time} for j in jobs]


def follow(address: str | None, job_id: str, out=None) -> str:
    """Stream the job's logs until it ends; its final status."""
    c = client(address)
    out = out or sys.stdout

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # the stream can drop when the job ends; the status tells
        print(f"rayalign: log stream ended: {exc}", file=sys.stderr)
    for _ in range(120):
        st = status(address, job_id)["status"]
        if st in TERMINAL:
            return st
        time.sleep(1)
    return status(address, job_id)["status"]
