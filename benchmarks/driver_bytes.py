"""Bytes through the driver per PPO iteration at growing batch sizes (the data plane).

Policy, reference and critic are actor groups on an embedded Ray (tiny llama, one rank
each, ZeRO-1); the reward is a Python function scored in a task. The prompt set is put
in the object store once, as ``rayalign ppo`` does; each iteration's prompts are drawn
there. Counted: every argument the driver sends to a group call, a task or the object
store, and every answer it reads (``rayalign.batch.TRAFFIC``; object references count as
their 28-byte ids). Beside it, the size of the iteration's training batch in the object
store: what a driver that gathers rollouts would hold and send again per minibatch.

    .venv/bin/python benchmarks/driver_bytes.py --batches 8 64 256 --out benchmarks/results/driver_bytes_tiny.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def even_share(prompts, samples):
    return [sum(t % 2 == 0 for t in s["response_ids"]) / max(1, len(s["response_ids"])) for s in samples]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--iterations", type=int, default=3, help="measured iterations per batch size (after one warm-up)")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import ray
    import torch
    import transformers

    from rayalign.batch import TRAFFIC, Batch, column, put, task
    from rayalign.cluster import ray_session
    from rayalign.config import ClusterConfig, GroupConfig, ModelConfig, TrainConfig, ZeroConfig
    from rayalign.pipelines.common import role_group
    from rayalign.pipelines.ppo import iteration_prompts, ppo_iteration
    from rayalign.workers.critic import CriticWorker
    from rayalign.workers.frozen import FrozenLMWorker
    from rayalign.workers.policy import PolicyWorker

    model = ModelConfig(name="tiny-llama").model_dump()
    group = GroupConfig(workers=1, cpus_per_worker=0.5, zero=ZeroConfig(stage=1))
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(ray_session(ClusterConfig(num_cpus=4)))
        # One micro-batch per optimizer step whatever the minibatch's size (DeepSpeed fixes
        # the accumulation count at start), so one set of groups serves every batch size.
        mb = max(args.batches) // args.minibatches
        train = TrainConfig(lr=1e-5, batch_size=mb, micro_batch_size=mb, lr_schedule="constant")
        pol = stack.enter_context(role_group("policy", PolicyWorker, group))
        pol.init_model(model, group.zero.model_dump(), train.model_dump(), 1000)
        ref = stack.enter_context(role_group("reference", FrozenLMWorker, group))
        ref.init_model(model, group.zero.model_dump(), True)
        cri = stack.enter_context(role_group("critic", CriticWorker, group))
        cri.init_model(model, group.zero.model_dump(), train.model_dump(), 1000)
        prompts = [f"Question {i}: say something about the number {i}." for i in range(max(args.batches) * 4)]
        dataset = put(Batch({"prompt": column("prompt", prompts)}), remote=True)
        kw = dict(temperature=1.0, max_new_tokens=args.new_tokens, rollout_batch_size=64, epochs=args.epochs,
                  minibatches=args.minibatches, overlap="off")
        for n in args.batches:
            per = []
            for it in range(args.iterations + 1):
                TRAFFIC.reset(on=True)
                t0 = time.perf_counter()
                _, batch = task(iteration_prompts, dataset, it, n, 0, 1)
                m = ppo_iteration(pol, ref, cri, even_share, batch, seed=it, **kw)
                dt = time.perf_counter() - t0
                sent, got, by = TRAFFIC.sent_bytes, TRAFFIC.received_bytes, dict(TRAFFIC.by_call)
                TRAFFIC.reset(on=False)
                if it == 0:
                    continue  # warm-up: Adam's state and the caches exist after it
                per.append({"driver_sent": sent, "driver_received": got, "driver_total": sent + got,
                            "batch_bytes": m["batch_nbytes"], "iteration_s": dt, "by_call": by})
                print(f"batch {n:4d} iteration {it}: driver {sent + got:7d} B (sent {sent}, received {got}); "
                      f"training batch in the object store {m['batch_nbytes']:9d} B; {dt:.1f}s", flush=True)
            rows.append({"batch": n, "driver_total_bytes": [r["driver_total"] for r in per],
                         "driver_sent_bytes": [r["driver_sent"] for r in per],
                         "driver_received_bytes": [r["driver_received"] for r in per],
                         "batch_bytes": [r["batch_bytes"] for r in per],
                         "iteration_s": [round(r["iteration_s"], 2) for r in per],
                         "by_call": [r["by_call"] for r in per]})
    base = statistics.median(rows[0]["driver_total_bytes"])
    for r in rows:
        r["driver_vs_smallest"] = round(statistics.median(r["driver_total_bytes"]) / base, 3)
        r["batch_vs_smallest"] = round(statistics.median(r["batch_bytes"]) / statistics.median(rows[0]["batch_bytes"]), 2)
    out = {"benchmark": "driver_bytes", "model": "tiny-llama", "roles": "policy, reference, critic: 1 rank each, ZeRO-1",
           "settings": {"new_tokens": args.new_tokens, "epochs": args.epochs, "minibatches": args.minibatches,
                        "reward": "python function in a task"},
           "rows": rows,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__},
           "command": "python benchmarks/driver_bytes.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps({r["batch"]: (r["driver_vs_smallest"], r["batch_vs_smallest"]) for r in rows}))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
