"""LoRA against full fine-tuning: per-rank memory measured and as `rayalign plan` estimates it.

One in-process policy rank (ZeRO-1, fp32) per setting takes a few SFT steps; the engine's
own tensors are then walked (parameters, gradients, optimizer state: ``memory()``), and
the tensors alive at the step's peak are noted (``track_memory``). The plan's estimate for
the same role is printed beside it. For PPO, LoRA also drops the reference group (its
reference is the policy's base), which the plan shows as one role fewer.

    python benchmarks/lora_memory.py [--model smollm2-135m-instruct] [--r 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MB = 2**20


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is None:
        return _both(args, argv)

    import torch
    import transformers

    from rayalign import data, models
    from rayalign.cluster.group import LocalGroup
    from rayalign.cluster.plan import RoleLoad, estimate
    from rayalign.config import GroupConfig, LoraConfig, ModelConfig, TrainConfig, ZeroConfig
    from rayalign.workers.policy import PolicyWorker

    tok = models.load_tokenizer(models.resolve(args.model))
    rows = data.load_rows("packaged:chatterbot", ["prompt", "response"], max_samples=args.micro)
    ex = [data.encode_sft(tok, r["prompt"], r["response"] * 8, args.length) for r in rows]
    targets = sum(1 for e in ex for x in e["labels"][1:] if x != -100)
    zero = ZeroConfig(stage=1)
    out: dict = {}
    for name, lora in (("full", None), ("lora", LoraConfig(r=args.r))):
        if name != args.one:
            continue
        train = TrainConfig(lr=1e-5, batch_size=args.micro, micro_batch_size=args.micro, lora=lora)
        grp = LocalGroup("policy", PolicyWorker, threads=2)
        try:
            grp.init_model({"name": args.model}, zero.model_dump(), train.model_dump(), args.steps)
            grp.track_memory(True)
            for _ in range(args.steps):
                grp.train_step(ex, targets)
            mem = grp.memory()[0]
            trainable = sum(p.numel() for p in grp.worker.engine.module.parameters() if p.requires_grad)
        finally:
            grp.kill()
        plan = estimate(RoleLoad("sft", "policy", ModelConfig(name=args.model), GroupConfig(zero=zero), train=train,
                                 train_tokens=args.length))
        out = {"trainable_params": trainable,
                     "measured_mb": {k: round(mem[k] / MB, 1) for k in ("params", "grads", "optimizer", "total")},
                     "held_at_step_mb": round(mem["held_at_step"] / MB, 1),
                     "plan_state_mb": round(plan["state"] / MB, 1), "plan_trainable": plan["trainable_n"]}
        print(f"{name}: {trainable / 1e6:.2f}M trainable; state measured {out['measured_mb']} MB, plan "
              f"{out['plan_state_mb']} MB; tensors alive at the step {out['held_at_step_mb']} MB", flush=True)
    print("RESULT " + json.dumps(out))
    return out


def _both(args, argv) -> dict:
    """Each setting in its own process: a rank's tensors are measured by walking every live
    tensor, and a finished worker's would still be counted in the same process."""
    import subprocess

    import torch
    import transformers

    out = {}
    for name in ("full", "lora"):
        cmd = [sys.executable, __file__, "--one", name] + [a for a in (argv if argv is not None else sys.argv[1:])]
        cmd = [c for i, c in enumerate(cmd) if c != "--out" and (i == 0 or cmd[i - 1] != "--out")]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not lines:
            raise SystemExit(f"{name} run failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
        print(next(x for x in p.stdout.splitlines() if x.startswith(name + ":")), flush=True)
        out[name] = json.loads(lines[-1][len("RESULT "):])
    f, lo = out["full"]["held_at_step_mb"], out["lora"]["held_at_step_mb"]
    out["at_step_ratio_lora_over_full"] = round(lo / f, 3)
    print(f"at the optimizer step LoRA r={args.r} holds {lo / f:.2f}x full fine-tuning's tensors per rank "
          f"({lo:.0f} MB against {f:.0f} MB); plan: {out['lora']['plan_state_mb']:.0f} against "
          f"{out['full']['plan_state_mb']:.0f} MB")
    res = {"benchmark": "lora_memory", "model": args.model, "zero_stage": 1, "r": args.r, "results": out,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": __import__("peft").__version__},
           "command": "python benchmarks/lora_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
