"""Joining an existing Ray cluster through RAY_ADDRESS instead of an embedded one."""
import json
import os
import subprocess
import sys

import pytest


pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def test_sft_joins_ray_address(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # A head node of our own (not `ray start`, whose `ray stop` would end every Ray on
    # the machine); the CLI reaches it only through RAY_ADDRESS, from another process.
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        cfg = tmp_path / "tiny.yaml"
        cfg.write_text(f"""
name: joined
model: {{name: tiny-llama}}
tracking: {{root: {tmp_path}, wandb: disabled}}
sft:
  data: {{source: packaged:chatterbot, max_samples: 24, max_length: 32}}
  group: {{workers: 2, zero: {{stage: 1}}}}
  train: {{lr: 1.0e-3, batch_size: 4, micro_batch_size: 2, max_steps: 2}}
""")
        run = tmp_path / "run"
        out = subprocess.run([sys.executable, "-m", "rayalign.cli", "sft", str(cfg), "--run-dir", str(run)],
                             env=dict(env, RAY_ADDRESS=cluster.address), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Connecting to existing Ray cluster" in out.stderr
        assert json.loads((run / "summary.json").read_text())["sft"]["steps"] == 2
    finally:
        cluster.shutdown()
