"""Reward models on a synthetic preference set with a learnable rule, 1 and 2 workers."""
import json
import random

import pytest

from rayalign.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

WORDS = "the quick brown fox jumps over the lazy dog what is the capital of france paris bread flour".split()


def make_pairs(path, n=240, seed=0):
    """The preferred response is the one that says thank you; soft labels from a noisy
    labeler (p in 0.75-0.95), slots randomised."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = " ".join(rng.choices(WORDS, k=5)) + "?"
        filler = " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
        good, bad = f"{filler} thank you.", f"{filler} no."
        p = rng.uniform(0.75, 0.95)
        if rng.random() < 0.5:
            rows.append({"prompt": q, "response_1": good, "response_2": bad, "p": p})
        else:
            rows.append({"prompt": q, "response_1": bad, "response_2": good, "p": 1 - p})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("workers,stage", [(1, 0), (2, 2)])
def test_reward_model_learns_rule(local_ray, tmp_path, workers, stage):
    src = tmp_path / "pairs.jsonl"
    make_pairs(src)
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"""
name: rm-rule
tracking: {{root: {tmp_path}, wandb: disabled}}
rm:
  data: {{source: {src}, max_length: 48, eval_fraction: 0.2}}
  model: {{name: tiny-llama}}
  group: {{workers: {workers}, zero: {{stage: {stage}}}}}
  train: {{lr: 2.0e-3, batch_size: 16, micro_batch_size: 4, epochs: 4, lr_schedule: constant}}
  loss: {{type: soft, centering: 0.01}}
""")
    run = tmp_path / "run"
    assert main(["rm", str(cfg), "--run-dir", str(run)]) == 0
    s = json.loads((run / "summary.json").read_text())["rm"]
    print(f"{workers} worker(s), ZeRO-{stage}: held-out accuracy {s['eval_accuracy']:.2f}")
    assert s["eval_accuracy"] >= 0.9
    stats = json.loads((run / "final" / "rm" / "reward_stats.json").read_text())
    assert stats["std"] > 0
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(run / "final" / "rm")
    assert m.config.num_labels == 1


def test_rm_rejects_bad_labels(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "q", "response_1": "a", "response_2": "b", "p": 1.7}) + "\n")
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"rm: {{data: {{source: {src}}}, model: {{name: tiny-llama}}}}\ntracking: {{root: {tmp_path}}}\n")
    assert main(["rm", str(cfg)]) == 2
    assert "row 1: preference must be a probability in [0, 1] or 1/2, got 1.7" in capsys.readouterr().err
