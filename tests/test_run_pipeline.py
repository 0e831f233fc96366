"""`rayalign run`: SFT → sampled pairs → AI labels → reward model → PPO in one run
directory, on tiny models, shaped like the quickstart (pairwise labels in both orders with
log-odds combination, harmlessness decided on the request, the rule-based refusal reward,
RLOO, a win rate on the first held-out prompts); stages with outputs are skipped when the
run is resumed."""
import json
import os

import pytest

from rayalign.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def test_run_all_stages_then_skip(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
name: tiny-run
model: {{name: tiny-llama}}
cluster: {{num_cpus: 2, object_store_memory_mb: 150}}
tracking: {{root: {tmp_path / 'runs'}, wandb: disabled}}
sft:
  data: {{source: packaged:chatterbot, max_samples: 48, max_length: 48}}
  group: {{workers: 2, cpus_per_worker: 0.5, zero: {{stage: 2}}}}
  train: {{lr: 3.0e-3, batch_size: 8, micro_batch_size: 2, max_steps: 4}}
labeler:
  mode: pairwise
  swap_combine: logodds
  temperature: 0.5
  harm: request
  refusal_bias: -2.0
  backend: {{type: hf, group: {{workers: 1, cpus_per_worker: 0.25}}}}
label:
  source: packaged:mixed-prompts
  max_samples: 24
  sample: {{max_new_tokens: 12, group: {{workers: 1, cpus_per_worker: 1}}}}
rm:
  model: {{name: tiny-bert}}
  group: {{workers: 1, cpus_per_worker: 1}}
  train: {{lr: 1.0e-3, batch_size: 4, micro_batch_size: 2, max_steps: 4}}
ppo:
  prompts: {{source: packaged:mixed-prompts, max_samples: 40, eval_prompts: 8}}
  policy: {{group: {{workers: 1, cpus_per_worker: 0.5}}, train: {{lr: 1.0e-3, micro_batch_size: 4}}}}
  reference: {{workers: 1, cpus_per_worker: 0.25}}
  rewards:
    - {{type: rm, weight: 1.0, group: {{workers: 1, cpus_per_worker: 0.25}}}}
    - {{type: refusal, weight: 0.5}}
    - {{type: function, weight: 2.0, function: "ppo_rewards:vowel_share"}}
  algo: {{iterations: 2, prompts_per_iteration: 4, samples_per_prompt: 2, estimator: rloo, max_new_tokens: 8}}
  eval: {{judge_gold: "packaged:hhh-pairs", judge_gold_samples: 4, max_new_tokens: 8, reward_every: 1,
          reward_prompts: 4, win_rate_prompts: 5}}
""")
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--run-dir", str(run)]) == 0
    out = capsys.readouterr()
    for f in ("final/sft/config.json", "samples.jsonl", "labels.jsonl", "label_report.json",
              "final/rm/config.json", "final/rm/reward_stats.json", "final/policy/config.json",
              "plots/sft.png", "plots/rm.png", "plots/ppo.png", "README.md"):
        assert (run / f).is_file(), f
    labels = [json.loads(x) for x in (run / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 24 and all(0 <= r["p"] <= 1 for r in labels)
    # Each label was either compared by the judge in both orders or decided on the request.
    assert all(("p_order_21" in r) != ("p_should_refuse" in r) for r in labels)
    assert all("harm-request-self" in r["labeler"] and "logodds-T0.5" in r["labeler"] for r in labels)
    # the tiny SFT policy sometimes stops at once; most samples have text
    assert sum(bool(r["response_1"]) for r in labels) >= 18
    s = json.loads((run / "summary.json").read_text())
    assert set(s) >= {"sft", "label", "rm", "ppo"}
    assert s["ppo"]["policy_start"] == str(run / "final" / "sft")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ppo_rows = [r for r in rows if r["stage"] == "ppo"]
    assert len(ppo_rows) == 2 and {"reward_rm", "reward_refusal", "reward_function"} <= set(ppo_rows[0])
    assert "win rate of the PPO policy vs the SFT policy" in out.out
    readme = (run / "README.md").read_text()
    assert "judge agreement with people (packaged:hhh-pairs)" in readme
    # The held-out reward on the same 4 prompts before training and after each iteration.
    curve = [r for r in rows if r["stage"] == "ppo_heldout"]
    assert [r["step"] for r in curve] == [0, 1, 2]
    assert s["ppo"]["heldout_reward_curve"] == [[r["step"], r["heldout_reward"]] for r in curve]
    assert "held-out reward, start → end" in readme and (run / "plots" / "ppo_heldout.png").is_file()
    # Rule-based refusal rates on the 8 held-out prompts, split by kind.
    ref, ans = s["ppo"]["refusal_rate_harmful"], s["ppo"]["answer_rate_benign"]
    assert ref["final"]["n"] + ans["final"]["n"] == 8 and ref["final"]["n"] > 0 and ans["final"]["n"] > 0
    assert "refusal rate on held-out harmful questions" in readme
    assert s["ppo"]["win_rate_prompts"] == 5 and s["ppo"]["eval_prompts"] == 8
    assert 0 <= s["ppo"]["identical_answers"] <= 5
    lo, hi = s["ppo"]["win_rate_ci95"]
    assert lo <= s["ppo"]["win_rate_vs_start"] <= hi

    # Everything exists: a resumed run skips every stage and changes nothing.
    before = (run / "metrics.jsonl").read_text()
    assert main(["run", str(cfg), "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    for stage in ("sft", "label", "rm", "ppo"):
        assert f"{stage}: output exists; stage skipped" in err
    assert (run / "metrics.jsonl").read_text() == before
