"""DPO and IPO: pair encoding, the policy worker's loss against the formula on its own
log-probs, learning a preference in process, and `rayalign dpo` / `rayalign run` with DPO
on actor groups (ZeRO-3 policy, a reference group)."""
import json
import math
import os
import random

import pytest

from rayalign.cli import main
from rayalign.config import RMDataConfig, TrainConfig, ZeroConfig

MODEL = {"name": "tiny-llama"}
WORDS = ["please", "thanks", "kindly", "glad", "sure", "gladly"]
RUDE = ["no", "go", "away", "stop", "never", "whatever"]


def write_pairs(path, n, seed=0, soft=False):
    """Pairs whose preferred response is polite words, the other rude ones, in either
    order; ``soft``: the labels are confidences (0.8/0.2) rather than gold 1/2."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            good = " ".join(rng.choice(WORDS) for _ in range(4))
            bad = " ".join(rng.choice(RUDE) for _ in range(4))
            first = rng.random() < 0.5
            p = (0.8 if soft else 1) if first else (0.2 if soft else 2)
            fh.write(json.dumps({"prompt": f"question number {i}?", "response_1": good if first else bad,
                                 "response_2": bad if first else good, "p": p}) + "\n")
    return path


def tokenizer(tiny_dir):
    from rayalign import models

    return models.load_tokenizer(tiny_dir)


def test_encode_pairs(tiny_dir, tmp_path):
    from rayalign import data
    from rayalign.pipelines.dpo import encode_pairs

    tok = tokenizer(tiny_dir)
    src = write_pairs(tmp_path / "pairs.jsonl", 20, soft=True)
    train, evals, skipped = encode_pairs(RMDataConfig(source=str(src), eval_fraction=0.25), tok)
    assert len(train) + len(evals) == 20 and len(evals) == 5 and skipped == 0
    q = train[0]
    assert q["p"] in (0.8, 0.2) and q["ids_1"] and q["ids_2"]
    # The responses are what SFT trains: the chat turn after the generation prompt.
    row = next(json.loads(x) for x in open(src) if tok.decode(q["prompt_ids"]).count(json.loads(x)["prompt"]))
    enc = data.encode_sft(tok, row["prompt"], row["response_1"], 256)
    assert q["prompt_ids"] + q["ids_1"] == enc["input_ids"]
    # A prompt that fills max_length leaves nothing to compare; with no pair left, an error.
    with pytest.raises(data.DataError, match="no pair has a response token within max_length 8"):
        encode_pairs(RMDataConfig(source=str(src), max_length=8, eval_fraction=0.0), tok)
    with pytest.raises(Exception, match="missing preference field"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a", "response_1": "b", "response_2": "c"}) + "\n")
        encode_pairs(RMDataConfig(source=str(tmp_path / "bad.jsonl")), tok)


def local_roles(lr=3e-3, batch=8):
    from rayalign.cluster.group import LocalGroup
    from rayalign.workers.frozen import FrozenLMWorker
    from rayalign.workers.policy import PolicyWorker

    tr = TrainConfig(lr=lr, batch_size=batch, micro_batch_size=4, lr_schedule="constant", grad_clip=1.0)
    pol = LocalGroup("policy", PolicyWorker, threads=1)
    pol.init_model(MODEL, ZeroConfig().model_dump(), tr.model_dump(), 200)
    ref = LocalGroup("reference", FrozenLMWorker, threads=1)
    ref.init_model(MODEL, {}, True)
    return pol, ref


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_policy_loss_is_the_formula_on_its_own_logprobs(tiny_dir, tmp_path, kind):
    import torch

    from rayalign.algos import preference as pr
    from rayalign.pipelines.dpo import attach_reference, encode_pairs

    pol, ref = local_roles(lr=1e-2)
    train, _, _ = encode_pairs(RMDataConfig(source=str(write_pairs(tmp_path / "p.jsonl", 8, soft=True)),
                                            eval_fraction=0.0), tokenizer(tiny_dir))
    attach_reference(ref, train)
    # Move the policy away from the reference first, so h is not 0.
    pol.dpo_update(train, len(train), kind, 0.1, 0.1)
    samples = [{"prompt_ids": q["prompt_ids"], "response_ids": q[k]} for q in train for k in ("ids_1", "ids_2")]
    lp = [sum(x) for x in pol.token_logprobs(samples)]
    h = pr.dpo_margin(torch.tensor(lp[0::2]), torch.tensor(lp[1::2]), torch.tensor([q["ref_1"] for q in train]),
                      torch.tensor([q["ref_2"] for q in train]))
    assert h.abs().max() > 1e-3
    want = pr.preference_loss(kind, h, torch.tensor([q["p"] for q in train]), 0.1, 0.1).mean().item()
    got = pol.dpo_eval(train, kind, 0.1, 0.1)
    assert sum(got["loss"]) / sum(got["pairs"]) == pytest.approx(want, rel=1e-4, abs=1e-5)


@pytest.mark.timeout(300)
def test_dpo_learns_a_preference_in_process(tiny_dir, tmp_path):
    from rayalign.pipelines.dpo import attach_reference, encode_pairs, evaluate_pairs, pair_metrics
    from rayalign.config import DPOLossConfig
    from rayalign.pipelines.sft import batch_for_step

    pol, ref = local_roles()
    train, evals, _ = encode_pairs(RMDataConfig(source=str(write_pairs(tmp_path / "p.jsonl", 96)),
                                                eval_fraction=0.25), tokenizer(tiny_dir))
    attach_reference(ref, train + evals)
    loss = DPOLossConfig()
    before = evaluate_pairs(pol, evals, loss)
    # The policy starts as the reference: h = 0 and every pair costs log 2.
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-3)
    first = pair_metrics(pol.dpo_update(batch_for_step(train, 0, 8, 0), 8, "sigmoid", 0.1, 0.1))
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    for step in range(1, 27):
        pol.dpo_update(batch_for_step(train, step, 8, 0), 8, "sigmoid", 0.1, 0.1)
    after = evaluate_pairs(pol, evals, loss)
    print(before, after)
    assert after["eval_loss"] < math.log(2) - 0.1
    assert after["eval_reward_accuracy"] >= 0.9 and after["eval_margin"] > 0.5
    assert after["eval_reward_chosen"] > after["eval_reward_rejected"]


def dpo_yaml(tmp_path, pairs, extra=""):
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"""
name: tiny-dpo
model: {{name: tiny-llama}}
cluster: {{num_cpus: 2, object_store_memory_mb: 150}}
tracking: {{root: {tmp_path / 'runs'}, wandb: disabled}}
labeler:
  backend: {{type: hf, group: {{workers: 1, cpus_per_worker: 0.25, threads_per_worker: 1}}}}
dpo:
  data: {{source: {pairs}, eval_fraction: 0.25, max_length: 64}}
  policy:
    group: {{workers: 2, cpus_per_worker: 0.5, zero: {{stage: 3}}}}
    train: {{lr: 3.0e-3, lr_schedule: constant, batch_size: 8, micro_batch_size: 2, epochs: 2, save_every: 6}}
  reference: {{workers: 1, cpus_per_worker: 0.25}}
  prompts: {{source: packaged:mixed-prompts, max_samples: 40, eval_prompts: 6}}
  eval: {{judge_gold: "packaged:hhh-pairs", judge_gold_samples: 4, max_new_tokens: 8}}
{extra}""")
    return cfg


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_rayalign_dpo_on_a_zero3_policy(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 64, soft=True)
    cfg = dpo_yaml(tmp_path, pairs)
    run = tmp_path / "run"
    assert main(["dpo", str(cfg), "--run-dir", str(run)]) == 0
    s = json.loads((run / "summary.json").read_text())["dpo"]
    assert s["zero_stage"] == 3 and s["steps"] == 12 and s["train_pairs"] == 48
    assert s["eval_loss_before"] == pytest.approx(math.log(2), abs=2e-3)
    assert s["eval_loss"] < s["eval_loss_before"] and s["eval_reward_accuracy"] > 0.75, s
    assert 0 <= s["win_rate_ci95"][0] <= s["win_rate_vs_start"] <= s["win_rate_ci95"][1] <= 1
    assert s["judge_gold_source"] == "packaged:hhh-pairs"
    for f in ("final/policy/config.json", "plots/dpo.png", "plots/dpo_eval.png", "metrics.jsonl"):
        assert (run / f).is_file(), f
    # Bad settings stop the command before it starts, naming the key.
    assert main(["dpo", str(cfg), "dpo.loss.type=hinge"]) == 2
    assert "dpo.loss.type" in capsys.readouterr().err
    assert main(["dpo", str(cfg), "dpo.policy.train.batch_size=6"]) == 2
    assert "dpo.policy.train.batch_size (6) must be a multiple" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_run_with_dpo_instead_of_rm_and_ppo(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
name: tiny-run-dpo
model: {{name: tiny-llama}}
cluster: {{num_cpus: 2, object_store_memory_mb: 150}}
tracking: {{root: {tmp_path / 'runs'}, wandb: disabled}}
sft:
  data: {{source: packaged:chatterbot, max_samples: 48, max_length: 48}}
  group: {{workers: 1, cpus_per_worker: 1}}
  train: {{lr: 3.0e-3, batch_size: 8, micro_batch_size: 4, max_steps: 2}}
labeler:
  backend: {{type: hf, group: {{workers: 1, cpus_per_worker: 0.25}}}}
label:
  source: packaged:mixed-prompts
  max_samples: 24
  sample: {{max_new_tokens: 12, group: {{workers: 1, cpus_per_worker: 1}}}}
dpo:
  policy: {{group: {{workers: 1, cpus_per_worker: 0.5}}, train: {{lr: 1.0e-3, batch_size: 4, micro_batch_size: 4,
            max_steps: 3}}}}
  loss: {{type: ipo, tau: 0.5}}
  reference: {{workers: 1, cpus_per_worker: 0.25}}
  prompts: {{source: packaged:mixed-prompts, max_samples: 40, eval_prompts: 6}}
  eval: {{judge_gold: "packaged:hhh-pairs", judge_gold_samples: 4, max_new_tokens: 8}}
""")
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    s = json.loads((run / "summary.json").read_text())
    assert set(s) >= {"sft", "label", "dpo"} and "rm" not in s and "ppo" not in s
    assert s["dpo"]["policy_start"] == str(run / "final" / "sft") and s["dpo"]["loss_type"] == "ipo"
    assert s["dpo"]["train_pairs"] + s["dpo"]["eval_pairs"] + s["dpo"]["pairs_too_long"] == 24
    readme = (run / "README.md").read_text()
    assert "DPO loss (ipo, tau 0.5)" in readme and "win rate of the DPO policy vs the SFT policy" in out
    # Done stages are skipped on resume.
    assert main(["run", str(cfg), "--resume", str(run)]) == 0
    res = capsys.readouterr()
    assert "dpo: output exists; stage skipped" in res.out + res.err
    from rayalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="ppo and dpo both train the final policy"):
        load_config(cfg, ["ppo={prompts: {source: packaged:mixed-prompts}, rewards: [{type: labeler}]}"])
