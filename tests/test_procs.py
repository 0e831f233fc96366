"""Signals and process clean-up (no Ray)."""
import signal
import subprocess
import sys
import time

import pytest

CHILD = """
import os, signal, subprocess, sys, time
from rayalign.cluster.procs import Stopped, stop_on_signals
stop_on_signals()
sleeper = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(sleeper.pid, flush=True)
try:
    time.sleep(60)
except Stopped as e:
    from rayalign.cluster.procs import descendants, stop_all
    killed = stop_all(descendants(os.getpid()), grace_s=0.5)
    print("stopped", e.signum, killed == [sleeper.pid], flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_raise_stopped_and_stop_all_kills_what_ignores_sigterm(sig):
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    sleeper = int(p.stdout.readline())
    time.sleep(0.5)
    p.send_signal(sig)
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 3 and f"stopped {int(sig)} True" in out, out
    with pytest.raises(OSError):
        import os

        for _ in range(50):
            os.kill(sleeper, 0)  # gone (or a zombie of the exited parent, reaped by init)
            with open(f"/proc/{sleeper}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    raise OSError("zombie")
            time.sleep(0.1)
