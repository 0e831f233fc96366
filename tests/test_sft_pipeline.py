"""`rayalign sft` end to end on a tiny model: run directory, resume, CLI errors."""
import json

import pytest

from rayalign.cli import main
from rayalign.tracking import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def write_cfg(tmp_path, **extra):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
name: tiny
model: {{name: tiny-llama}}
cluster: {{num_cpus: 2, object_store_memory_mb: 150}}
tracking: {{root: {tmp_path / 'runs'}, wandb: {extra.get('wandb', 'disabled')}}}
sft:
  data: {{source: packaged:chatterbot, max_samples: 64, eval_fraction: 0.1, max_length: 48}}
  group: {{workers: 2, zero: {{stage: 1}}}}
  train: {{lr: 3.0e-3, lr_schedule: constant, batch_size: 8, micro_batch_size: 2, max_steps: 6, save_every: 3, eval_every: 3}}
""")
    return cfg


def test_sft_run_dir_and_resume(tmp_path, capsys):
    cfg = write_cfg(tmp_path, wandb="offline")
    run = tmp_path / "run"
    assert main(["sft", str(cfg), "--run-dir", str(run)]) == 0
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "summary.md", "plots/sft.png",
              "final/sft/config.json", "final/sft/model.safetensors", "final/sft/tokenizer.json"):
        assert (run / f).is_file(), f
    assert any((run / "wandb").glob("offline-run-*"))
    summary = json.loads((run / "summary.json").read_text())["sft"]
    assert summary["steps"] == 6 and summary["last_loss"] < summary["first_loss"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    full = [r["loss"] for r in read_metrics(run / "metrics.jsonl", "sft")]

    # Stop after step 3 (its checkpoint), then resume: the same losses as one run.
    run2 = tmp_path / "run2"
    assert main(["sft", str(cfg), "--run-dir", str(run2), "sft.train.max_steps=3"]) == 0
    assert main(["sft", str(cfg), "--resume", str(run2), "sft.group.workers=1",
                 "sft.group.zero.stage=3"]) == 0
    resumed = [r["loss"] for r in read_metrics(run2 / "metrics.jsonl", "sft")]
    assert len(resumed) == 6
    assert resumed == pytest.approx(full, rel=1e-3, abs=1e-3)

    # A rank SIGKILLed after step 4 inside one `rayalign sft`: the stage runs again from its
    # step-3 checkpoint by itself and ends with the same losses.
    import os
    import threading

    from rayalign.chaos import kill_during

    run3, hit, errors = tmp_path / "run3", [], []

    def strike():
        try:
            hit.extend(kill_during(os.getpid(), run3, "sft", [4], roles=("PolicyWorker",), timeout_s=300))
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    th = threading.Thread(target=strike, daemon=True)
    th.start()
    assert main(["sft", str(cfg), "--run-dir", str(run3), "tracking.wandb=disabled"]) == 0
    th.join(timeout=30)
    assert not errors and len(hit) == 1, (errors, hit)
    assert [r["loss"] for r in read_metrics(run3 / "metrics.jsonl", "sft")] == pytest.approx(full, rel=1e-3, abs=1e-3)
    rec = json.loads((run3 / "summary.json").read_text())["sft"]["recoveries"]
    assert len(rec) == 1 and "died" in rec[0]["what"], rec
    assert [r["step"] for r in read_metrics(run3 / "metrics.jsonl", "sft_recovery")] == [1]
    # from the step-3 commit (or step 6, had the kill landed after the last save)
    assert json.loads((run3 / "summary.json").read_text())["sft"]["resumed_from_step"] in (3, 6)


def test_cli_rejects_bad_input(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    assert main(["sft", str(cfg), "sft.train.batch_size=6"]) == 2
    assert "must be a multiple of sft.group.workers" in capsys.readouterr().err
    assert main(["sft", str(cfg), "sft.data.source=/nope.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sft", str(cfg), "sft.group.cpus_per_worker=16"]) == 2
    assert "cannot place" in capsys.readouterr().err
