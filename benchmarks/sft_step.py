"""SFT step time: rayalign's actor groups against a plain single-process PyTorch loop.

Same model, same batches, same optimizer settings, measured in one run on one machine.
The baseline is the loop a person would write without a framework; the ratio says what
rayalign's distribution (Ray actors, DeepSpeed engine, ZeRO) costs or saves here.

    python benchmarks/sft_step.py [--model smollm2-135m-instruct] [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def batches(model_name: str, batch: int, steps: int, max_length: int):
    from rayalign import data, models
    from rayalign.pipelines.sft import batch_for_step

    tok = models.load_tokenizer(models.resolve(model_name))
    rows = data.load_rows("packaged:chatterbot", ["prompt", "response"], max_samples=batch * (steps + 1))
    ex = [data.encode_sft(tok, r["prompt"], r["response"], max_length) for r in rows]
    return tok, [batch_for_step(ex, s, batch, 0) for s in range(steps + 1)]


def plain_torch(model_name, tok, steps_batches, threads, micro):
    import torch

    from rayalign import models
    from rayalign.algos.lm import layout_labeled, shifted_nll_sum

    torch.set_num_threads(threads)
    model = models.load_causal_lm(models.resolve(model_name))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    times = []
    for batch in steps_batches:
        t = time.perf_counter()
        tokens = sum(sum(1 for l in e["labels"][1:] if l != -100) for e in batch)
        for i in range(0, len(batch), micro):
            # The same layout as the rayalign ranks use by default (packed), so the two differ
            # only by what the framework adds.
            t, labels = layout_labeled(batch[i:i + micro], tok.pad_token_id, packed=True)
            nll, _ = shifted_nll_sum(model(**t.inputs("cpu")).logits, labels)
            (nll / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def rayalign_group(model_name, steps_batches, workers, stage, micro, batch):
    from rayalign.cluster import placement
    from rayalign.cluster.group import ActorGroup
    from rayalign.config import GroupConfig, TrainConfig, ZeroConfig
    from rayalign.pipelines.sft import data_targets
    from rayalign.workers.policy import PolicyWorker

    cpus = 2 // workers
    cfg = GroupConfig(workers=workers, cpus_per_worker=cpus, zero=ZeroConfig(stage=stage))
    train = TrainConfig(lr=1e-5, batch_size=batch, micro_batch_size=micro, lr_schedule="constant")
    pools = placement.place({"policy": cfg})
    grp = ActorGroup("policy", PolicyWorker, cfg, pools)
    try:
        grp.init_model({"name": model_name}, cfg.zero.model_dump(), train.model_dump(), len(steps_batches))
        times = []
        for b in steps_batches:
            t = time.perf_counter()
            grp.train_step(b, sum(map(data_targets, b)))
            times.append(time.perf_counter() - t)
        return times
    finally:
        grp.kill()
        placement.release(pools.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/results/sft_step.json")
    args = ap.parse_args()

    import ray
    import torch

    tok, bs = batches(args.model, args.batch, args.steps, args.max_length)
    results = {}
    # The first step of each arm is a warm-up and is left out of the mean.
    results["plain_torch_1proc_2threads"] = plain_torch(args.model, tok, bs, 2, args.micro)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        results["rayalign_1worker_zero0"] = rayalign_group(args.model, bs, 1, 0, args.micro, args.batch)
        results["rayalign_2workers_zero2"] = rayalign_group(args.model, bs, 2, 2, args.micro, args.batch)
        results["rayalign_2workers_zero3"] = rayalign_group(args.model, bs, 2, 3, args.micro, args.batch)
    finally:
        ray.shutdown()
    base = sum(results["plain_torch_1proc_2threads"][1:]) / args.steps
    rows = []
    print(f"\n{'arm':<30}{'s/step':>10}{'vs plain torch':>16}")
    for arm, times in results.items():
        mean = sum(times[1:]) / args.steps
        rows.append({"arm": arm, "mean_step_s": mean, "speedup_vs_baseline": base / mean, "steps_s": times})
        print(f"{arm:<30}{mean:>10.2f}{base / mean:>15.2f}x")
    import deepspeed
    import transformers

    out = {
        "benchmark": "sft_step", "command": " ".join(sys.argv), "model": args.model,
        "batch": args.batch, "micro_batch": args.micro, "max_length": args.max_length, "steps": args.steps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                     "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
