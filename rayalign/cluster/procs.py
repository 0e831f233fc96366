"""The processes a command started: found through /proc (Linux), stopped for certain."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (an embedded Ray's daemons and actors); empty
    where /proc is not there."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for d in proc.iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def is_ray_process(pid: int) -> bool:
    """Ray's daemons (raylet, GCS, dashboard and agents) and workers (``ray::...``), not
    other children of this process."""
    try:
        cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    return cmd.startswith(b"ray::") or b"/ray/" in cmd or b"raylet" in cmd or b"gcs_server" in cmd


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def stop_all(pids: list[int], grace_s: float = 5.0) -> list[int]:
    """Wait up to ``grace_s`` for ``pids`` to end, then SIGKILL what is left (some of
    Ray's agents ignore SIGTERM). Returns the PIDs that had to be killed."""
    deadline = time.time() + grace_s
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    killed = []
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
                killed.append(p)
            except OSError:
                pass
    return killed


class Stopped(KeyboardInterrupt):
    """SIGTERM (or SIGINT) as an exception: every ``with`` block on the way out runs, so the
    embedded Ray and every role's processes are stopped."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Past this, a clean-up that hangs is cut short: what the command started is killed and
# the process exits (systemd and Kubernetes send SIGKILL 30 s after SIGTERM by default).
STOP_DEADLINE_S = 25.0
_installed = False


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise :class:`Stopped` in the main thread (the CLI's), with a
    deadline after which everything this process started is killed. ``ray.init`` installs
    its own SIGTERM handler (exit 1, no reason): :func:`ray_session` calls this again after
    it, where the CLI installed it first."""
    global _installed
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the clean-up short

        def force():
            print(f"rayalign: the clean-up did not finish within {STOP_DEADLINE_S:g}s; killing what it started",
                  file=sys.stderr, flush=True)
            stop_all(descendants(os.getpid()), grace_s=0)
            os._exit(128 + int(signum))

        t = threading.Timer(STOP_DEADLINE_S, force)
        t.daemon = True
        t.start()
        raise Stopped(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    _installed = True


def restore_stop_handlers() -> None:
    """After ``ray.init``: our handlers again, where the CLI had installed them."""
    if _installed:
        stop_on_signals()
