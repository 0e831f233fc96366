"""GRPO and its variants on one verifiable reward: how fast the pass rate rises, what each
variant samples, and how far it moves from the reference.

The tiny random Llama (tests' `tiny-llama`), 16 prompts x 4 samples per iteration, 16 new
tokens, a pass/fail reward (more than 60% of the response's token ids even), 20
iterations, 2 epochs x 8 minibatches, lr 6e-3 (far above a real run's, to learn in 20
iterations). Every variant runs with the same seeds in one process; the pass rate is the
first sampling round's (dynamic sampling's kept batch leaves out groups that all passed or
all failed).

    .venv/bin/python benchmarks/grpo_variants.py [--seeds 3] [--iterations 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

from rayalign.config import TrainConfig, ZeroConfig  # noqa: E402
from rayalign.pipelines.ppo import ppo_iteration  # noqa: E402

MODEL = {"name": "tiny-llama"}
PROMPTS = [f"hello! how are you today? {i}" for i in range(16)]
EXTRA = [f"what is {i} plus {i + 1}?" for i in range(48)]

VARIANTS = {
    # The KL penalty in the reward, token mean (what `estimator: group_norm` did before).
    "group_norm, KL in reward": dict(estimator="group_norm", kl_coef=0.05),
    "GRPO": dict(estimator="group_norm", kl_coef=0.05, kl_in_loss=True, kl_estimator="k3",
                 loss_agg="seq_mean_token_mean"),
    "Dr. GRPO": dict(estimator="group_mean", kl_coef=0.05, kl_in_loss=True, kl_estimator="k3",
                     loss_agg="seq_mean_token_sum_norm"),
    "DAPO": dict(estimator="group_norm", kl_coef=0.0, loss_agg="token_mean", clip_high=0.28,
                 dynamic_sampling=True, max_sampling_rounds=3),
}


def even_pass(prompts, samples):
    return [float(sum(t % 2 == 0 for t in s["response_ids"]) / len(s["response_ids"]) > 0.6) for s in samples]


def run(kw: dict, seed: int, iterations: int) -> dict:
    import torch

    from rayalign.cluster.group import LocalGroup
    from rayalign.workers.frozen import FrozenLMWorker
    from rayalign.workers.policy import PolicyWorker

    torch.manual_seed(seed)
    tr = TrainConfig(lr=6e-3, batch_size=8, micro_batch_size=4, lr_schedule="constant", grad_clip=1.0, seed=seed)
    pol = LocalGroup("policy", PolicyWorker, threads=1)
    pol.init_model(MODEL, ZeroConfig().model_dump(), tr.model_dump(), 400)
    ref = LocalGroup("reference", FrozenLMWorker, threads=1)
    ref.init_model(MODEL, {}, True)
    rows = []
    t0 = time.time()
    for it in range(iterations):
        m = ppo_iteration(pol, ref, None, even_pass, PROMPTS, temperature=1.0, max_new_tokens=16,
                          samples_per_prompt=4, epochs=2, minibatches=8, seed=seed * 1000 + it,
                          more_prompts=lambda r, it=it: EXTRA[(it * 2 + r) % 3 * 16:][:16], **kw)
        rows.append(m)
    return {"pass_first4": statistics.fmean(m["reward_mean"] for m in rows[:4]),
            "pass_last4": statistics.fmean(m["reward_mean"] for m in rows[-4:]),
            "first_iteration_reaching_0.9": next((i + 1 for i, m in enumerate(rows) if m["reward_mean"] >= 0.9), None),
            "kl_last": rows[-1]["kl"], "kl_max": max(m["kl"] for m in rows),
            "sampling_rounds_mean": statistics.fmean(m.get("sampling_rounds", 1) for m in rows),
            "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_variants.json"))
    args = ap.parse_args()
    result: dict = {"setup": __doc__.split("\n\n")[1].replace("\n", " "), "variants": {}}
    for name, kw in VARIANTS.items():
        runs = [run(kw, s, args.iterations) for s in range(args.seeds)]
        summary = {}
        for k in ("pass_first4", "pass_last4", "kl_last", "kl_max", "sampling_rounds_mean", "seconds"):
            vals = [r[k] for r in runs]
            summary[k] = {"mean": round(statistics.fmean(vals), 4), "min": round(min(vals), 4),
                          "max": round(max(vals), 4)}
        summary["first_iteration_reaching_0.9"] = [r["first_iteration_reaching_0.9"] for r in runs]
        result["variants"][name] = summary
        print(f"{name:26s} pass {summary['pass_first4']['mean']:.2f} -> {summary['pass_last4']['mean']:.2f} "
              f"[{summary['pass_last4']['min']:.2f}-{summary['pass_last4']['max']:.2f}]  reach 0.9 at "
              f"{summary['first_iteration_reaching_0.9']}  KL last {summary['kl_last']['mean']:.2f}  rounds "
              f"{summary['sampling_rounds_mean']['mean']:.2f}  {summary['seconds']['mean']:.0f}s", flush=True)
    provenance.write(args.out, result)


if __name__ == "__main__":
    main()
