"""The residual warm-up ablation on the correction data, scored by rule on held-out sets.

    python benchmarks/aligner_recipes.py --split dev                 # choose: fractions 0 / 0.2 / 0.5
    python benchmarks/aligner_recipes.py --split heldout --fractions 0.2 --per-set 100   # report once

Every arm trains `configs/aligner.yaml` (or --config) for the same number of optimizer steps
in all (`--steps`): warm-up steps on Q-A-A (correction := answer) for the fraction, the rest
on Q-A-C — so an arm with a warm-up sees fewer correction steps, and a difference is the
warm-up's, not extra compute's. Each arm is scored before training, after its warm-up and at
the end on the same sets (rayalign/corrections.py): wrong answers corrected, right answers
kept, harmful questions refused, harmless questions refused, each with its 95% interval.
Results: benchmarks/results/aligner_recipes_{split}.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rayalign.config import load_config  # noqa: E402
from rayalign.pipelines.aligner import MEASURES, load_data, run_aligner_train  # noqa: E402


def arm_overrides(cfg, fraction: float, steps: int) -> list[str]:
    """Overrides that give this warm-up fraction `steps` optimizer steps in all."""
    rows, _, _ = load_data(cfg)
    b = cfg.aligner.train.batch_size
    warm = (int(round(len(rows) * fraction)) // b) * cfg.aligner.warmup_epochs
    main = steps - warm
    if main < 1:
        raise SystemExit(f"--steps {steps} leaves no correction steps after {warm} warm-up steps")
    epochs = -(-main // (len(rows) // b))
    return [f"aligner.warmup_fraction={fraction}", f"aligner.train.max_steps={main}",
            f"aligner.train.epochs={epochs}"]


def cell(v: dict | None) -> str:
    if not v or v.get("rate") is None:
        return "-"
    return f"{v['rate']:.0%} [{v['ci95'][0]:.0%}, {v['ci95'][1]:.0%}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/aligner.yaml")
    ap.add_argument("--split", choices=["dev", "heldout"], default="dev")
    ap.add_argument("--fractions", default="0,0.2,0.5")
    ap.add_argument("--steps", type=int, default=72, help="optimizer steps per arm, warm-up included")
    ap.add_argument("--per-set", type=int, default=48)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    fractions = [float(x) for x in args.fractions.split(",")]
    base = [f"aligner.eval.split={args.split}", f"aligner.eval.per_set={args.per_set}",
            "aligner.eval.judge=none", "tracking.wandb=disabled", *args.overrides]
    arms = []
    for f in fractions:
        cfg0 = load_config(args.config, base)
        ov = base + arm_overrides(cfg0, f, args.steps) + [f"name=aligner-w{f:g}-{args.split}"]
        cfg = load_config(args.config, ov)
        t0 = time.time()
        s = run_aligner_train(cfg)
        run = Path(s["final_model"]).parents[1]
        ev = json.loads((run / "aligner_eval.json").read_text())["sets"]
        arms.append({"warmup_fraction": f, "warmup_steps": s["warmup_steps"], "steps": s["steps"],
                     "overrides": ov, "run_dir": str(run), "wall_s": round(time.time() - t0, 1),
                     "data_mixture": s["data_mixture"], "sets": ev})
        print(f"warm-up {f:g}: {s['warmup_steps']} + {s['steps'] - s['warmup_steps']} steps, "
              f"{time.time() - t0:.0f}s", flush=True)

    import torch
    import transformers

    res = {"benchmark": "aligner_recipes", "split": args.split, "config": args.config, "steps": args.steps,
           "per_set": args.per_set, "command": "python " + " ".join(sys.argv),
           "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                       "torch": torch.__version__, "transformers": transformers.__version__},
           "arms": arms}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"aligner_recipes_{args.split}.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Aligner warm-up ablation ({args.split}; {args.steps} steps per arm, {args.per_set} items per set)",
             "", "| warm-up fraction | measure | before | after warm-up | final |", "|---|---|---|---|---|"]
    for a in arms:
        for key, text, _, _ in MEASURES:
            lines.append(f"| {a['warmup_fraction']:g} | {text} | " + " | ".join(
                cell(a["sets"].get(w, {}).get(key)) for w in ("before", "after_warmup", "final")) + " |")
    (out / f"aligner_recipes_{args.split}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
