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
from typing import Callable

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


def progress(run_dir: Path, stage: str = "ppo") -> tuple[int, int]:
    """(last step logged, recoveries logged) of ``stage`` in a run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    done = max((r["step"] for r in rows if r["stage"] == stage), default=0)
    return done, sum(r["stage"] == f"{stage}_recovery" for r in rows)


def kill_during(pid: int, run_dir: Path, stage: str, after: list[int], seed: int = 0,
                roles: tuple[str, ...] = ("PolicyWorker", "CriticWorker"), timeout_s: float = 600,
                signals: list[int] | None = None, running: Callable[[], bool] = lambda: True) -> list[dict]:
    """Signal a random rank of a random role of ``roles`` (among ``pid``'s descendants) once
    ``stage`` has logged each step in ``after`` and recovered from the previous failure.
    ``signals``: one per entry of ``after``, SIGKILL by default; SIGSTOP freezes the rank (a
    hung process, which only the role's call timeout can find). ``running``: whether the
    job still runs. Returns what was hit."""
    signals = list(signals) if signals is not None else [signal.SIGKILL] * len(after)
    if len(signals) != len(after):
        raise ValueError(f"{len(after)} steps to strike after but {len(signals)} signals")
    rng = random.Random(seed)
    killed: list[dict] = []
    deadline = time.time() + timeout_s
    for k in after:
        while True:
            if not running():
                raise RuntimeError(f"the job ended before failure {len(killed) + 1}")
            if time.time() > deadline:
                raise TimeoutError(f"{stage} step {k} was not logged within {timeout_s:g}s")
            done, recovered = progress(run_dir, stage)
            if done >= k and recovered == len(killed):
                break
            time.sleep(0.05)
        role = rng.choice(list(roles))
        pids = ranks_of(pid, role)
        if not pids:
            raise RuntimeError(f"no {role} process under pid {pid}")
        victim = rng.choice(pids)
        sig = signals[len(killed)]
        os.kill(victim, sig)
        killed.append({"role": role, "pid": victim, "after_step": k, "time": time.time(),
                       "signal": signal.Signals(sig).name})
    return killed


def kill_during_ppo(proc: subprocess.Popen, run_dir: Path, after: list[int], seed: int = 0,
                    roles: tuple[str, ...] = ("PolicyWorker", "CriticWorker"),
                    timeout_s: float = 600, signals: list[int] | None = None) -> list[dict]:
    """:func:`kill_during` of a ``rayalign ppo`` process, after PPO iterations."""
    return kill_during(proc.pid, run_dir, "ppo", after, seed, roles, timeout_s, signals,
                       running=lambda: proc.poll() is None)
