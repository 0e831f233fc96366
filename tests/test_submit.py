"""`rayalign submit` / `rayalign jobs` against a real head node started with `ray start --head`.

The head node runs in its own session and temp dir with its own ports, and is stopped
by signalling that session (never `ray stop`, which would end every Ray on the machine).
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rayalign import jobs
from rayalign.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _kill_tree(proc: subprocess.Popen, temp_dir: str) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    # Anything of this head node that left the session (raylet, GCS, workers) names its
    # temp dir on its command line.
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def head_node():
    temp_dir = tempfile.mkdtemp(prefix="rs_", dir="/tmp")
    gcs, dash, agent, agent_grpc, metrics, rt_agent, nm, om, client = free_ports(9)
    lo = free_ports(1)[0]
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--include-dashboard", "true", "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(rt_agent), "--node-manager-port", str(nm),
           "--object-manager-port", str(om), "--ray-client-server-port", str(client),
           # (below Linux's ephemeral range, 32768+, where the nine ports above come from: a
           # worker range reaching into it once collided with one of them)
           "--min-worker-port", str(10000 + lo % 20000), "--max-worker-port", str(10000 + lo % 20000 + 200),
           "--object-store-memory", str(200 * 2**20), "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray_start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("ray start exited: " + (Path(temp_dir) / "ray_start.log").read_text()[-3000:])
            try:  # (the client carries Ray's auth token, on by default for local clusters)
                jobs.client(url).list_jobs()
                break
            except Exception:
                pass
            time.sleep(1)
        else:
            raise RuntimeError("the head node's dashboard did not come up in 180 s")
        yield url
    finally:
        _kill_tree(proc, temp_dir)
        log.close()


TINY_SFT = """\
name: submitted-tiny
model: {name: tiny-llama}
tracking: {root: %(root)s, wandb: disabled}
sft:
  data: {source: packaged:chatterbot, max_samples: 24, max_length: 48}
  group: {workers: 1, cpus_per_worker: 1}
  train: {batch_size: 4, micro_batch_size: 2, max_steps: 3, lr: 1.0e-3}
"""


def test_submit_follow_status_logs_and_stop(head_node, tmp_path, capsys):
    work = tmp_path / "project"
    work.mkdir()
    runs = tmp_path / "runs"
    (work / "tiny.yaml").write_text(TINY_SFT % {"root": runs})
    env = [f"--env=RAYALIGN_CACHE={os.environ.get('RAYALIGN_CACHE') or Path.home() / '.cache' / 'rayalign'}"]

    # A bad config is rejected here, before anything reaches the cluster.
    (work / "bad.yaml").write_text(TINY_SFT.replace("lr: 1.0e-3", "lr: -1") % {"root": runs})
    before = main(["jobs", "list", "--address", head_node])
    listed_before = capsys.readouterr().out.count("\n")
    assert before == 0
    rc = main(["submit", str(work / "bad.yaml"), "--working-dir", str(work), "--address", head_node])
    err = capsys.readouterr().err
    assert rc == 2 and "sft.train.lr" in err and "greater than 0" in err
    assert main(["jobs", "list", "--address", head_node]) == 0
    assert capsys.readouterr().out.count("\n") == listed_before  # nothing was submitted

    # A good one runs to completion; its logs stream back.
    rc = main(["submit", str(work / "tiny.yaml"), "--working-dir", str(work), "--address", head_node,
               "--follow", "--submission-id", "rayalign-test-sft", *env])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "submitted rayalign-test-sft" in out and "job rayalign-test-sft: SUCCEEDED" in out
    assert "final_model" in out and "[rayalign] run directory:" in out  # the job's own output
    run_dirs = list(runs.iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "summary.json").is_file()

    assert main(["jobs", "status", "rayalign-test-sft", "--address", head_node]) == 0
    assert "rayalign-test-sft: SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", "rayalign-test-sft", "--address", head_node]) == 0
    logs = capsys.readouterr().out
    assert "rayalign" in logs and "sft" in logs

    # A long job can be stopped.
    long_cfg = TINY_SFT.replace("max_steps: 3", "max_steps: 100000").replace("max_samples: 24", "max_samples: 400")
    (work / "long.yaml").write_text(long_cfg % {"root": runs})
    assert main(["submit", str(work / "long.yaml"), "sft.train.epochs=1000", "--working-dir", str(work),
                 "--address", head_node, "--submission-id", "rayalign-test-long", *env]) == 0
    capsys.readouterr()
    deadline = time.time() + 120
    while time.time() < deadline:
        main(["jobs", "status", "rayalign-test-long", "--address", head_node])
        if "RUNNING" in capsys.readouterr().out:
            break
        time.sleep(1)
    assert main(["jobs", "stop", "rayalign-test-long", "--address", head_node]) == 0
    assert "stop requested" in capsys.readouterr().out
    deadline = time.time() + 120
    status = ""
    while time.time() < deadline:
        main(["jobs", "status", "rayalign-test-long", "--address", head_node])
        status = capsys.readouterr().out
        if "STOPPED" in status:
            break
        time.sleep(1)
    assert "STOPPED" in status

    # A script runs as a job too: the scaling benchmark, unchanged, on the cluster.
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "scaling"
    rc = main(["submit", str(root / "benchmarks" / "scaling.py"), "--working-dir", str(root), "--address", head_node,
               "--follow", "--script-args", f"--address auto --zero 0 --workers 1 --steps 1 --no-ppo --seq 32 "
               f"--out {out}", *env])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    assert "sft  ZeRO-0 x1" in text and out.with_suffix(".json").is_file() and out.with_suffix(".png").is_file()

    # Unknown ids and unreachable clusters get a clear error.
    assert main(["jobs", "status", "no-such-job", "--address", head_node]) == 2
    assert "no job 'no-such-job'" in capsys.readouterr().err
    assert main(["jobs", "status", "x", "--address", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err


def test_submit_refuses_a_config_outside_the_uploaded_dir(tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "c.yaml").write_text(TINY_SFT % {"root": tmp_path})
    rc = main(["submit", str(tmp_path / "c.yaml"), "--working-dir", str(tmp_path / "w"), "--dry-run"])
    assert rc == 2 and "outside the working directory" in capsys.readouterr().err
    rc = main(["submit", str(tmp_path / "c.yaml"), "--working-dir", str(tmp_path), "--dry-run",
               "--env", "A=1"])
    out = capsys.readouterr().out
    assert rc == 0 and "python -m rayalign.cli sft c.yaml cluster.address=auto" in out and '"A": "1"' in out
