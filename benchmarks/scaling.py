"""Scaling: ZeRO stages 0-3 x 1, 2, 4 workers, for an SFT step and a PPO iteration.

Per configuration it measures, on every rank, the tensor bytes held after the last
backward (parameters, gradients, optimizer state), the bytes autograd saved for a
micro-batch and the ZeRO-3 parameters gathered during the forward, plus step time and
throughput; and it puts `rayalign plan`'s estimate for the same role beside each
measurement (the error is reported). Results: CSV + JSON (machine, versions, command)
and PNG plots.

Here it runs on a simulated multi-node local cluster (``ray.cluster_utils.Cluster``,
``--nodes`` nodes splitting the logical CPUs). On a real cluster the same script runs
unchanged, connected to it: ``--address auto`` (what a job submitted with
``rayalign submit --script benchmarks/scaling.py -- --address auto --gpus-per-worker 1``
gets), GPUs per rank with ``--gpus-per-worker``.

    python benchmarks/scaling.py                         # tiny model: SFT + PPO grid
    python benchmarks/scaling.py --model smollm2-135m-instruct --workers 1,2 --no-ppo
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = {"name": "tiny-llama", "overrides": {"hidden_size": 256, "intermediate_size": 768,
                                            "num_hidden_layers": 4, "num_attention_heads": 4,
                                            "num_key_value_heads": 2}}


def even_share(prompts, samples):
    """A verifiable reward (share of even token ids): no reward model in the way."""
    return [sum(t % 2 == 0 for t in s["response_ids"]) / max(1, len(s["response_ids"])) for s in samples]


def model_dict(name: str) -> dict:
    return dict(TINY) if name == "tiny" else {"name": name}


def group_cfg(args, workers: int, stage: int):
    from rayalign.config import GroupConfig, ZeroConfig

    return GroupConfig(workers=workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                       threads_per_worker=args.threads_per_worker, zero=ZeroConfig(stage=stage),
                       ready_timeout_s=300)


def sft_examples(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(seq)]
        out.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": [-100] * (seq // 4) + ids[seq // 4:]})
    return out


def estimate_for(args, model: dict, role: str, cfg, train, tokens: int, head: str = "causal",
                 gen_batch: int = 0, gen_tokens: int = 0) -> dict:
    from rayalign.cluster.plan import RoleLoad, estimate
    from rayalign.config import ModelConfig

    return estimate(RoleLoad("bench", role, ModelConfig(**model, dtype=args.dtype), cfg, head=head, train=train,
                             train_tokens=tokens, gen_batch=gen_batch, gen_tokens=gen_tokens))


def run_sft(args, model: dict, stage: int, workers: int) -> dict:
    from rayalign.config import ModelConfig, TrainConfig
    from rayalign.pipelines.common import role_group
    from rayalign.workers.policy import PolicyWorker

    train = TrainConfig(lr=1e-4, batch_size=args.batch, micro_batch_size=1, lr_schedule="constant")
    cfg = group_cfg(args, workers, stage)
    with role_group("policy", PolicyWorker, cfg) as grp:
        info = grp.init_model(ModelConfig(**model, dtype=args.dtype).model_dump(), cfg.zero.model_dump(),
                              train.model_dump(), args.steps + 2)
        from rayalign.cluster.plan import model_shape

        vocab = model_shape(ModelConfig(**model)).vocab
        examples = sft_examples(args.batch, args.seq, vocab, 0)
        tokens = sum(sum(1 for t in e["labels"] if t != -100) - 1 for e in examples)
        grp.train_step(examples, tokens)  # Adam's state exists from the first step on
        r = grp.train_step(examples, tokens, measure_memory=True)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            grp.train_step(examples, tokens)
            times.append(time.perf_counter() - t0)
    est = estimate_for(args, model, "policy", cfg, train, args.seq)
    held, act, gat = max(r["held_bytes"]), max(r["activation_bytes"]), max(r["gathered_bytes"])
    measured = held + act + gat
    step = statistics.median(times)
    return {"task": "sft", "model": model["name"], "params": info["params"], "zero": stage, "workers": workers,
            "step_s": round(step, 3), "tokens_per_s": round(args.batch * args.seq / step, 1),
            "held_mb": held / 2**20, "activations_mb": act / 2**20, "gathered_mb": gat / 2**20,
            "measured_mb": measured / 2**20,
            "est_state_mb": est["state"] / 2**20, "est_activations_mb": est["activations"] / 2**20,
            "est_gathered_mb": est["gathered"] / 2**20, "est_mb": est["device"] / 2**20,
            "error": est["device"] / measured - 1, "state_error": est["state"] / held - 1}


def run_ppo(args, model: dict, stage: int, workers: int) -> dict:
    from rayalign.config import ModelConfig, TrainConfig
    from rayalign.pipelines.common import role_group
    from rayalign.pipelines.ppo import ppo_iteration
    from rayalign.workers.critic import CriticWorker
    from rayalign.workers.frozen import FrozenLMWorker
    from rayalign.workers.policy import PolicyWorker

    n_prompts = max(args.ppo_prompts, workers)
    train = TrainConfig(lr=1e-5, batch_size=n_prompts, micro_batch_size=max(1, n_prompts // workers),
                        lr_schedule="constant")
    cfg = group_cfg(args, workers, stage)
    mdict = ModelConfig(**model, dtype=args.dtype).model_dump()
    with contextlib.ExitStack() as stack:
        pol = stack.enter_context(role_group("policy", PolicyWorker, cfg))
        info = pol.init_model(mdict, cfg.zero.model_dump(), train.model_dump(), 10)
        ref = stack.enter_context(role_group("reference", FrozenLMWorker, cfg))
        ref.init_model(mdict, cfg.zero.model_dump(), True)
        cri = stack.enter_context(role_group("critic", CriticWorker, cfg))
        cri.init_model(mdict, cfg.zero.model_dump(), train.model_dump(), 10)
        prompts = [f"Question {i}: say something." for i in range(n_prompts)]
        kw = dict(temperature=1.0, max_new_tokens=args.ppo_new_tokens, min_new_tokens=args.ppo_new_tokens,
                  rollout_batch_size=max(1, n_prompts // workers), overlap="off")
        ppo_iteration(pol, ref, cri, even_share, prompts, seed=0, **kw)  # warm: Adam's state exists after it
        pol.track_memory(True)
        cri.track_memory(True)
        ppo_iteration(pol, ref, cri, even_share, prompts, seed=0, **kw)
        pmem, cmem = pol.memory(), cri.memory()
        pol.track_memory(False)
        cri.track_memory(False)
        times, parts = [], []
        for it in range(args.steps):
            t0 = time.perf_counter()
            m = ppo_iteration(pol, ref, cri, even_share, prompts, seed=it + 1, **kw)
            times.append(time.perf_counter() - t0)
            parts.append({k: m.get(k) for k in ("generate_s", "score_s", "train_s")})
    seq = 16 + args.ppo_new_tokens  # the prompts above are ~12-16 tokens with the chat wrapper
    est_p = estimate_for(args, model, "policy", cfg, train, seq, gen_batch=max(1, n_prompts // workers),
                         gen_tokens=seq)
    est_c = estimate_for(args, model, "critic", cfg, train, seq, head="value")
    it_s = statistics.median(times)
    held_p = max(m["held_at_step"] for m in pmem)
    held_c = max(m["held_at_step"] for m in cmem)
    return {"task": "ppo", "model": model["name"], "params": info["params"], "zero": stage, "workers": workers,
            "iteration_s": round(it_s, 3), "samples_per_s": round(n_prompts / it_s, 2),
            "generate_s": statistics.median(p["generate_s"] or 0 for p in parts),
            "train_s": statistics.median(p["train_s"] or 0 for p in parts),
            "policy_state_mb": held_p / 2**20, "critic_state_mb": held_c / 2**20,
            "est_policy_state_mb": est_p["state"] / 2**20, "est_critic_state_mb": est_c["state"] / 2**20,
            "policy_state_error": est_p["state"] / held_p - 1, "critic_state_error": est_c["state"] / held_c - 1}


def sft_line(r: dict) -> str:
    return (f"sft  ZeRO-{r['zero']} x{r['workers']}: {r['step_s']:.2f} s/step, {r['tokens_per_s']:.0f} tok/s, per rank "
            f"measured {r['measured_mb']:.1f} MiB (held {r['held_mb']:.1f} + saved {r['activations_mb']:.1f} + "
            f"gathered {r['gathered_mb']:.1f}), plan {r['est_mb']:.1f} MiB ({100 * r['error']:+.1f}%)")


def ppo_line(r: dict) -> str:
    return (f"ppo  ZeRO-{r['zero']} x{r['workers']}: {r['iteration_s']:.2f} s/iteration, policy state "
            f"{r['policy_state_mb']:.1f} MiB (plan {100 * r['policy_state_error']:+.1f}%), critic "
            f"{r['critic_state_mb']:.1f} MiB (plan {100 * r['critic_state_error']:+.1f}%)")


def _panel_row(axes, rows: list[dict], keys: tuple[str, str, str, str], titles: tuple[str, str, str],
               ylabels: tuple[str, str]) -> None:
    """One row of plots: memory measured vs planned, speed, plan error; a line per ZeRO stage."""
    measured, planned, speed, error = keys
    ax_m, ax_t, ax_e = axes
    for z in range(4):
        zr = sorted((r for r in rows if r["zero"] == z), key=lambda r: r["workers"])
        if not zr:
            continue
        w = [r["workers"] for r in zr]
        line, = ax_m.plot(w, [r[measured] for r in zr], "o-", label=f"ZeRO-{z} measured")
        ax_m.plot(w, [r[planned] for r in zr], "x--", color=line.get_color(), label=f"ZeRO-{z} plan")
        ax_t.plot(w, [r[speed] for r in zr], "o-", label=f"ZeRO-{z}")
        ax_e.plot(w, [100 * r[error] for r in zr], "o-", label=f"ZeRO-{z}")
    ax_m.set(title=titles[0], xlabel="workers", ylabel="MiB")
    ax_t.set(title=titles[1], xlabel="workers", ylabel=ylabels[0])
    ax_e.set(title=titles[2], xlabel="workers", ylabel=ylabels[1])
    ax_e.axhspan(-25, 25, color="green", alpha=0.08)
    for ax in axes:
        ax.set_xticks([1, 2, 4])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = [r for r in rows if r["task"] == "sft"]
    ppo = [r for r in rows if r["task"] == "ppo"]
    models = sorted({r["model"] for r in sft})
    n = len(models) + bool(ppo)
    fig, axes = plt.subplots(n, 3, figsize=(15, 4 * n), squeeze=False)
    for mi, name in enumerate(models):
        _panel_row(axes[mi], [r for r in sft if r["model"] == name],
                   ("measured_mb", "est_mb", "tokens_per_s", "error"),
                   (f"SFT {name}: per-rank tensor memory", f"SFT {name}: throughput", f"SFT {name}: plan error"),
                   ("tokens/s", "% (estimate / measured - 1)"))
    if ppo:
        _panel_row(axes[-1], ppo, ("policy_state_mb", "est_policy_state_mb", "iteration_s", "policy_state_error"),
                   (f"PPO {ppo[0]['model']}: policy state per rank", "PPO: iteration time (workers per role)",
                    "PPO: plan error (policy state)"), ("s / iteration", "%"))
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (a 4-layer llama) or a model name / directory")
    ap.add_argument("--zero", default="0,1,2,3")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seq", type=int, default=128, help="SFT tokens per sequence")
    ap.add_argument("--batch", type=int, default=8, help="SFT global batch (sequences per step)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps / iterations per configuration")
    ap.add_argument("--no-ppo", action="store_true")
    ap.add_argument("--ppo-prompts", type=int, default=8)
    ap.add_argument("--ppo-new-tokens", type=int, default=16)
    ap.add_argument("--address", help="an existing Ray cluster (`auto` inside a submitted job); default: a "
                    "simulated local cluster")
    ap.add_argument("--nodes", type=int, default=2, help="simulated nodes (the local CPUs split between them)")
    ap.add_argument("--cpus-per-worker", type=float, default=0.5)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling"),
                    help="prefix for .json, .csv and .png")
    args = ap.parse_args()

    import ray
    import torch
    import transformers

    from rayalign.cluster.plan import model_shape
    from rayalign.config import ModelConfig

    cluster = None
    if args.address:
        ray.init(address=args.address)
    else:
        from ray.cluster_utils import Cluster

        most = max(map(int, args.workers.split(",")))
        per_node = max(2, -(-int(most * 3 * args.cpus_per_worker * 2) // (2 * args.nodes)))  # 3 PPO roles
        cluster = Cluster()
        for i in range(args.nodes):
            cluster.add_node(num_cpus=per_node, resources={f"sim_node_{i}": 1},
                             object_store_memory=256 * 2**20)
        ray.init(address=cluster.address)
    model = model_dict(args.model)
    model_shape(ModelConfig(**model))  # prepares the model once, before any rank needs it
    rows: list[dict] = []
    grid = [(z, w) for z in map(int, args.zero.split(",")) for w in map(int, args.workers.split(","))]
    tasks = [(run_sft, sft_line)] + ([] if args.no_ppo else [(run_ppo, ppo_line)])
    try:
        for run, line in tasks:
            for z, w in grid:
                t0 = time.time()
                r = run(args, model, z, w)
                rows.append(r)
                print(f"{line(r)}  [{time.time() - t0:.0f} s]", flush=True)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    for r in rows:
        for k, v in list(r.items()):
            if isinstance(v, float):
                r[k] = round(v, 4)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "ray": ray.__version__, "deepspeed": __import__("deepspeed").__version__},
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"model": model},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps(meta | {"rows": rows}, indent=1))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("task", "model", "zero", "workers"), k))
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    plot(rows, out.with_suffix(".png"))
    sft = [r for r in rows if r["task"] == "sft"]
    if sft:
        worst = max(sft, key=lambda r: abs(r["error"]))
        print(f"plan vs measured (SFT, per-rank tensor memory): worst {100 * worst['error']:+.1f}% "
              f"(ZeRO-{worst['zero']} x{worst['workers']})")
    print(f"wrote {out.with_suffix('.json')}, .csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
