"""Packed against padded sequences: training tokens per second on a length-skewed batch.

One in-process policy worker (ZeRO-1, fp32) runs the same optimizer steps in both layouts,
alternating packed and padded step by step, so drift in the machine hits both alike. Two
workloads, each a real step of the worker: SFT (``train_step``) and the PPO update
(``ppo_update``). Lengths are skewed the way chat data is: most sequences short, a few
long (the padded layout pays the longest in every row). Only real tokens are counted.

    python benchmarks/packing.py [--model smollm2-135m-instruct] [--micro 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def skewed_lengths(n: int, rng: random.Random, short: tuple[int, int], long: int, long_share: float) -> list[int]:
    return [long if rng.random() < long_share else rng.randint(*short) for _ in range(n)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--micro", type=int, default=8, help="sequences per forward (micro-batch)")
    ap.add_argument("--short", default="16,96", help="range of the short lengths")
    ap.add_argument("--long", type=int, default=512, help="length of the long sequences")
    ap.add_argument("--long-share", type=float, default=0.125)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from rayalign.cluster.group import LocalGroup
    from rayalign.config import TrainConfig, ZeroConfig
    from rayalign.workers.policy import PolicyWorker

    rng = random.Random(0)
    short = tuple(int(x) for x in args.short.split(","))
    train = TrainConfig(lr=1e-30, batch_size=args.micro, micro_batch_size=args.micro, lr_schedule="constant")
    grp = LocalGroup("policy", PolicyWorker, threads=args.threads)
    info = grp.init_model({"name": args.model}, ZeroConfig(stage=1).model_dump(), train.model_dump(),
                          10 * args.repeats)
    w = grp.worker
    if not info["packing"]:
        raise SystemExit(f"{args.model}: this architecture does not support packed sequences")
    vocab = len(w.tok)

    def sft_batch():
        out = []
        for n in skewed_lengths(args.micro, rng, short, args.long, args.long_share):
            ids = [rng.randrange(3, vocab) for _ in range(n)]
            k = max(1, n // 4)  # a prompt quarter, not scored
            out.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
        return out

    def ppo_batch():
        out = []
        for n in skewed_lengths(args.micro, rng, short, args.long, args.long_share):
            p = max(1, n // 3)
            r = n - p
            out.append({"prompt_ids": [rng.randrange(3, vocab) for _ in range(p)],
                        "response_ids": [rng.randrange(3, vocab) for _ in range(r)],
                        "old_logprobs": [-2.0] * r, "advantages": [rng.uniform(-1, 1) for _ in range(r)]})
        return out

    def run(kind: str, batch: list[dict], packed: bool) -> float:
        w.packing = packed
        t = time.perf_counter()
        if kind == "sft":
            grp.train_step(batch, sum(1 for e in batch for x in e["labels"][1:] if x != -100))
        else:
            grp.ppo_update(batch, sum(len(s["response_ids"]) for s in batch), 0.2, 1.0, 0.0)
        return time.perf_counter() - t

    results: dict = {}
    for kind, make in (("sft", sft_batch), ("ppo_update", ppo_batch)):
        batches = [make() for _ in range(args.repeats)]
        run(kind, batches[0], True), run(kind, batches[0], False)  # warm-up, not counted
        times = {"packed": [], "padded": []}
        for i, b in enumerate(batches):
            order = (True, False) if i % 2 == 0 else (False, True)
            for packed in order:
                times["packed" if packed else "padded"].append(run(kind, b, packed))
        real = [sum(len(e.get("input_ids", [])) or len(e["prompt_ids"]) + len(e["response_ids"]) for e in b)
                for b in batches]
        padded_tokens = [max(len(e.get("input_ids", [])) or len(e["prompt_ids"]) + len(e["response_ids"])
                             for e in b) * len(b) for b in batches]
        ratios = [d / p for p, d in zip(times["packed"], times["padded"])]
        results[kind] = {
            "tokens_per_s_packed": statistics.median(n / t for n, t in zip(real, times["packed"])),
            "tokens_per_s_padded": statistics.median(n / t for n, t in zip(real, times["padded"])),
            "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "step_s_packed": times["packed"], "step_s_padded": times["padded"],
            "real_tokens_per_step": statistics.fmean(real),
            "padded_positions_per_step": statistics.fmean(padded_tokens),
        }
        r = results[kind]
        print(f"{kind}: packed {r['tokens_per_s_packed']:.0f} tok/s, padded {r['tokens_per_s_padded']:.0f} tok/s, "
              f"speedup {r['speedup_median']:.2f}x [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] over "
              f"{args.repeats} steps; {r['real_tokens_per_step']:.0f} real of "
              f"{r['padded_positions_per_step']:.0f} padded positions per step", flush=True)
    grp.kill()
    out = {"benchmark": "packing", "model": args.model, "params": info["params"], "micro_batch": args.micro,
           "lengths": {"short": list(short), "long": args.long, "long_share": args.long_share},
           "repeats": args.repeats, "threads": args.threads, "results": results,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
           "command": "python benchmarks/packing.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
