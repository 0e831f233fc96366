"""Failure injection for recovery tests and benchmarks: SIGKILL a random rank of a role
of a running ``rayalign`` command, from outside, as a crashed process or a lost node
would look to the job. Linux only (reads /proc)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from .cluster.procs import descendants
from .tracking import read_metrics


def ranks_of(pid: int, worker_class: str) -> list[int]:
    """PIDs of a role's ranks among ``pid``'s descendants (Ray titles an actor's process
    ``ray::<class>``, with ``.<method>`` while it runs one)."""
    out = []
    for c in descendants(pid):
        try:
            if (Path("/proc") / str(c) / "cmdline").read_bytes().startswith(f"ray::{worker_class}".encode()):
                out.append(c)
        except OSError:
            pass
    return out


def ppo_progress(run_dir: Path) -> tuple[int, int]:
    """(iterations logged, recoveries logged) of a PPO run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    done = max((r["step"] for r in rows if r["stage"] == "ppo"), default=0)
    return done, sum(r["stage"] == "ppo_recovery" for r in rows)


def kill_during_ppo(proc: subprocess.Popen, run_dir: Path, after: list[int], seed: int = 0,
                    roles: tuple[str, ...] = ("PolicyWorker", "CriticWorker"),
                    timeout_s: float = 600) -> list[dict]:
    """SIGKILL a random rank of a random role of ``roles`` once the run has logged each
    iteration in ``after`` (and recovered from the previous kill). Returns what was killed."""
    rng = random.Random(seed)
    killed: list[dict] = []
    deadline = time.time() + timeout_s
    for k in after:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {proc.returncode}) before kill {len(killed) + 1}")
            if time.time() > deadline:
                raise TimeoutError(f"iteration {k} was not logged within {timeout_s:g}s")
            done, recovered = ppo_progress(run_dir)
            if done >= k and recovered == len(killed):
                break
            time.sleep(0.1)
        role = rng.choice(list(roles))
        pids = ranks_of(proc.pid, role)
        if not pids:
            raise RuntimeError(f"no {role} process under pid {proc.pid}")
        victim = rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        killed.append({"role": role, "pid": victim, "after_iteration": k, "time": time.time()})
    return killed
