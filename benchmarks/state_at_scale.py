"""State paths at size: a ~1B-parameter llama (random init), 2 ranks, ZeRO-3 with the optimizer
offloaded, on this machine — training steps, a sharded checkpoint, a resume that continues the
uninterrupted run, and a streamed Hugging Face export.

What it measures for each rank, sampled from outside the rank (its process RSS, 20 times a
second): host memory before the save, the peak during the save and during the export, against
the tensor bytes the rank's engine holds (its own state). A save that gathered the full state
would add ~16 bytes per parameter to every rank; a sharded one adds nothing it does not own.

    python benchmarks/state_at_scale.py                      # ~1B, ~15 min on 2 cores
    python benchmarks/state_at_scale.py --layers 2 --hidden 256 --intermediate 704 --out /tmp/s.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class RssPeak:
    """Peak resident memory of some processes while the block runs."""

    def __init__(self, pids: list[int], every_s: float = 0.05):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.every_s = every_s
        self.peak = [0] * len(pids)
        self._stop = threading.Event()

    def sample(self) -> list[int]:
        return [p.memory_info().rss for p in self.procs]

    def _run(self):
        while not self._stop.is_set():
            self.peak = [max(a, b) for a, b in zip(self.peak, self.sample())]
            time.sleep(self.every_s)

    def __enter__(self):
        self.before = self.sample()
        self.peak = list(self.before)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = [max(a, b) for a, b in zip(self.peak, self.sample())]
        return False


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="float32",
                    help="training dtype; bfloat16 is emulated (~20x slower) on CPUs without AVX-512 BF16")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-live", type=int, default=10**8, help="zero.max_live_parameters")
    ap.add_argument("--no-offload", action="store_true", help="keep the optimizer state with the parameters")
    ap.add_argument("--dir", default="/tmp/rayalign_state_at_scale")
    ap.add_argument("--out", default="benchmarks/results/state_at_scale.json")
    ap.add_argument("--ray", action="store_true", help="use the Ray already initialised (tests)")
    args = ap.parse_args(argv)

    import ray
    import torch

    from rayalign import data, models
    from rayalign.cluster import placement
    from rayalign.cluster.group import ActorGroup
    from rayalign.config import GroupConfig, TrainConfig, ZeroConfig
    from rayalign.pipelines.sft import batch_for_step, data_targets
    from rayalign.workers.policy import PolicyWorker

    overrides = {"hidden_size": args.hidden, "num_hidden_layers": args.layers,
                 "intermediate_size": args.intermediate, "num_attention_heads": args.heads,
                 "num_key_value_heads": args.kv_heads}
    model = {"name": "tiny-llama", "overrides": overrides, "dtype": args.dtype}
    t0 = time.time()
    model_dir = models.resolve("tiny-llama", 0, overrides)
    print(f"model at {model_dir} ({time.time() - t0:.0f}s)", flush=True)
    tok = models.load_tokenizer(model_dir)
    rows = data.load_rows("packaged:chatterbot", ["prompt", "response"], max_samples=16)
    examples = [data.encode_sft(tok, r["prompt"], r["response"], args.max_length) for r in rows]
    train = TrainConfig(lr=1e-4, batch_size=2, micro_batch_size=1, lr_schedule="constant", grad_clip=1.0)
    # Only a few layers gathered at a time (DeepSpeed's default keeps up to 1e9 parameters
    # gathered: the whole model at this size).
    zero = ZeroConfig(stage=3, offload_optimizer=not args.no_offload, max_live_parameters=args.max_live)
    cfg = GroupConfig(workers=2, cpus_per_worker=1, zero=zero)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    total = args.steps + 2
    out: dict = {"benchmark": "state_at_scale", "command": " ".join(sys.argv), "model": model,
                 "zero": zero.model_dump(), "workers": 2, "steps": args.steps}

    def start(resume_from=None):
        pools = placement.place({"policy": cfg})
        grp = ActorGroup("policy", PolicyWorker, cfg, pools, timeout_s=3600)
        t = time.time()
        info = grp.init_model(model, zero.model_dump(), train.model_dump(), total, resume_from)
        return grp, pools, info, time.time() - t

    def step(grp, s):
        batch = batch_for_step(examples, s, train.batch_size, train.seed)
        t = time.time()
        r = grp.train_step(batch, sum(map(data_targets, batch)))
        return sum(r["nll_sum"]) / sum(r["tokens"]), time.time() - t

    if not args.ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        grp, pools, info, load_s = start()
        out["params"] = info["params"]
        print(f"{info['params'] / 1e9:.2f}B parameters, loaded in {load_s:.0f}s", flush=True)
        pids = [i["pid"] for i in grp.node_info()]
        losses, times = [], []
        for s in range(args.steps):
            loss, dt = step(grp, s)
            losses.append(loss)
            times.append(dt)
            print(f"step {s}: loss {loss:.4f} ({dt:.0f}s)", flush=True)
        state = [m["total"] for m in grp.memory()]
        with RssPeak(pids) as save_mem:
            t = time.time()
            ck = grp.save_checkpoint(str(work / "ck"), args.steps, {"step": args.steps})
            save_s = time.time() - t
        ck_bytes = sum(f.stat().st_size for f in Path(ck).iterdir() if f.is_file())
        print(f"checkpoint {ck_bytes / 2**30:.2f} GiB in {save_s:.0f}s", flush=True)
        with RssPeak(pids) as export_mem:
            t = time.time()
            grp.export_hf(str(work / "hf"))
            export_s = time.time() - t
        print(f"HF export in {export_s:.0f}s", flush=True)
        cont, _ = step(grp, args.steps)  # the uninterrupted run's next step
        grp.kill()
        placement.release(pools.values())

        grp, pools, info, resume_load_s = start(ck)
        resumed, resumed_s = step(grp, args.steps)
        grp.kill()
        placement.release(pools.values())
    finally:
        if not args.ray:
            ray.shutdown()

    ranks = []
    for r in range(2):
        ranks.append({
            "rank": r, "state_bytes": state[r], "rss_before_save": save_mem.before[r],
            "rss_peak_save": save_mem.peak[r], "rss_peak_export": export_mem.peak[r],
            "save_peak_vs_before": save_mem.peak[r] / save_mem.before[r],
            "save_added_vs_state": (save_mem.peak[r] - save_mem.before[r]) / state[r],
            "save_peak_vs_state": save_mem.peak[r] / state[r],
            "export_peak_vs_before": export_mem.peak[r] / export_mem.before[r]})
    out.update({
        "load_s": load_s, "losses": losses, "step_s": times, "save_s": save_s, "checkpoint_bytes": ck_bytes,
        "export_s": export_s, "resume_load_s": resume_load_s, "resume_read": info["resume_read"],
        "next_step_loss_uninterrupted": cont, "next_step_loss_resumed": resumed,
        "resume_matches": abs(cont - resumed) <= 1e-4 * max(1.0, abs(cont)), "ranks": ranks,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                     "deepspeed": __import__("deepspeed").__version__,
                     "transformers": __import__("transformers").__version__},
    })
    print(f"\n{'rank':<6}{'state GiB':>10}{'RSS before':>12}{'peak save':>11}{'peak/before':>13}"
          f"{'added/state':>13}{'peak export':>13}")
    for r in ranks:
        print(f"{r['rank']:<6}{r['state_bytes'] / 2**30:>10.2f}{r['rss_before_save'] / 2**30:>12.2f}"
              f"{r['rss_peak_save'] / 2**30:>11.2f}{r['save_peak_vs_before']:>12.2f}x"
              f"{r['save_added_vs_state']:>12.2f}x{r['rss_peak_export'] / 2**30:>13.2f}")
    print(f"resume: next-step loss {resumed:.6f} vs uninterrupted {cont:.6f}; rank 0 read "
          f"{info['resume_read']['files']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"written {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
