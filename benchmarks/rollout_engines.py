"""Rollout throughput of the vLLM engine role against sampling inside the trainer (HF
generate), and the seconds of a weight sync, on the same machine, model and settings.

Both paths run as Ray actor groups as in a job (one rank each, the same threads; they
take turns, never overlap): the policy's ``rollout`` (transformers.generate inside the
DeepSpeed worker) and the rollout role's ``rollout`` (vLLM, weights synced from that
policy). Responses have a fixed length (min = max new tokens) so both produce the same
number of tokens; every measurement is repeated and the spread reported.

    python benchmarks/rollout_engines.py --out benchmarks/results/rollout_engines.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "How do I boil an egg?",
           "Tell me a joke about cats.", "Why is the sky blue?", "Name three prime numbers.",
           "How do plants make food?", "What is a good name for a dog?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--syncs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--enforce-eager", type=int, default=1, help="1: vLLM without compiled graphs (the CPU default)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import ray
    import torch
    import transformers
    import vllm

    from rayalign.cluster import ray_session
    from rayalign.config import ClusterConfig, GroupConfig, TrainConfig, ZeroConfig
    from rayalign.pipelines.common import role_group
    from rayalign.workers.policy import PolicyWorker
    from rayalign.workers.rollout import RolloutWorker

    g = GroupConfig(workers=1, cpus_per_worker=1, threads_per_worker=a.threads)
    model = {"name": a.model}
    train = TrainConfig(lr=1e-6, batch_size=8, micro_batch_size=8).model_dump()
    batches = [int(b) for b in a.batches.split(",")]
    res: dict = {"throughput": {}, "sync": {}}
    with ray_session(ClusterConfig(num_cpus=2, object_store_memory_mb=1024)):
        with role_group("policy", PolicyWorker, g) as policy, role_group("rollout", RolloutWorker, g) as engine:
            policy.init_model(model, ZeroConfig().model_dump(), train, 10)
            t = time.time()
            info = engine.init_engine(model, "vllm", {"max_model_len": 1024, "kv_cache_gb": 1.0,
                                                      "enforce_eager": bool(a.enforce_eager)}, -1)
            res["engine_init_s"] = info[0]["init_s"]
            print(f"vLLM engine ready in {time.time() - t:.0f}s", file=sys.stderr)
            syncs = []
            for v in range(a.syncs):
                t = time.time()
                r = policy.sync_weights(engine.actors, v, 64.0, 300.0)
                syncs.append(time.time() - t)
            res["sync"] = {"seconds": syncs, "median_s": statistics.median(syncs), "bytes": r["sync_bytes"],
                           "buckets": r["sync_buckets"], "params": r["params"]}
            print(f"sync: median {statistics.median(syncs):.2f}s over {a.syncs} ({r['sync_bytes'] / 2**20:.0f} MB in "
                  f"{r['sync_buckets']} buckets)", file=sys.stderr)
            v = a.syncs - 1
            for n in batches:
                prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(n)]

                def hf():
                    return policy.rollout(prompts, a.tokens, 0.7, 1.0, 0, n, a.tokens)

                def vl():
                    return engine.rollout(prompts, a.tokens, 0.7, 1.0, 0, n, a.tokens, v)

                hf(), vl()  # first call of a shape: allocations, kernels
                rows = []
                for rep in range(a.repeats):
                    t = time.time()
                    out_h = hf()
                    th = time.time() - t
                    t = time.time()
                    out_v = vl()
                    tv = time.time() - t
                    toks_h = sum(len(s["response_ids"]) for s in out_h)
                    toks_v = sum(len(s["response_ids"]) for s in out_v)
                    rows.append({"hf_s": th, "vllm_s": tv, "hf_tokens": toks_h, "vllm_tokens": toks_v,
                                 "hf_tok_s": toks_h / th, "vllm_tok_s": toks_v / tv,
                                 "ratio": (toks_v / tv) / (toks_h / th)})
                    print(f"batch {n} repeat {rep + 1}: HF {toks_h / th:.0f} tok/s, vLLM {toks_v / tv:.0f} tok/s "
                          f"({rows[-1]['ratio']:.2f}x)", file=sys.stderr)
                ratios = [r["ratio"] for r in rows]
                res["throughput"][str(n)] = {"repeats": rows, "ratio_median": statistics.median(ratios),
                                             "ratio_min": min(ratios), "ratio_max": max(ratios)}
    result = {
        "benchmark": "rollout_engines", "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm.__version__,
                     "ray": ray.__version__, "python": platform.python_version()},
        "settings": vars(a) | {"dtype": "float32", "temperature": 0.7},
        **res,
    }
    print(f"\n{'batch':<7}{'HF tok/s':>10}{'vLLM tok/s':>12}{'ratio (median, min-max)':>26}")
    for n, r in res["throughput"].items():
        hf = statistics.median(x["hf_tok_s"] for x in r["repeats"])
        vl = statistics.median(x["vllm_tok_s"] for x in r["repeats"])
        print(f"{n:<7}{hf:>10.0f}{vl:>12.0f}{r['ratio_median']:>12.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
    s = res["sync"]
    print(f"weight sync: {s['median_s']:.2f}s median ({min(s['seconds']):.2f}-{max(s['seconds']):.2f}), "
          f"{s['bytes'] / 2**20:.0f} MB")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
