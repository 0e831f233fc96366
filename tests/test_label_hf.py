"""`rayalign label` with a Hugging Face labeler on an actor group, sampling pairs from a
policy; the labeler sharded with ZeRO-3 across 2 ranks gives the ZeRO-0 numbers."""
import json

import pytest

from rayalign.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_label_samples_and_shards(local_ray, tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"what is the capital of france? ({i})"}) + "\n"
                           for i in range(6)))
    cfg = tmp_path / "label.yaml"
    cfg.write_text(f"""
name: hf-label
model: {{name: tiny-llama}}
tracking: {{root: {tmp_path}, wandb: disabled}}
labeler:
  mode: pairwise
  backend: {{type: hf, batch_size: 4, group: {{workers: 1}}}}
label:
  source: {src}
  chunk_size: 4
  sample: {{max_new_tokens: 8, temperature: 1.0, group: {{workers: 2}}}}
""")
    run = tmp_path / "z0"
    assert main(["label", str(cfg), "--run-dir", str(run)]) == 0
    recs = [json.loads(l) for l in (run / "labels.jsonl").read_text().splitlines()]
    assert len(recs) == 6
    assert all(r["response_1"] != r["response_2"] for r in recs)  # two different samples
    for r in recs:
        assert 0 < r["p"] < 1 and r["p"] == pytest.approx(0.5 * (r["p_order_12"] + 1 - r["p_order_21"]))
    rep = json.loads((run / "label_report.json").read_text())
    assert 0 <= rep["position_bias_rate"] <= 1

    # Same pairs (the samples are cached in the run dir), labeler sharded with ZeRO-3.
    run3 = tmp_path / "z3"
    run3.mkdir()
    (run3 / "samples.jsonl").write_text((run / "samples.jsonl").read_text())
    assert main(["label", str(cfg), "--resume", str(run3), "labeler.backend.group.workers=2",
                 "labeler.backend.group.zero.stage=3"]) == 0
    recs3 = [json.loads(l) for l in (run3 / "labels.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in recs3}
    for r in recs:
        assert by_id[r["id"]]["p"] == pytest.approx(r["p"], abs=1e-4)
