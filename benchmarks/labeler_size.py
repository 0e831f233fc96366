"""The labeler's size, side by side (after Lee et al. 2023's same-size vs larger labeler):
PPO from the same SFT policy with the same settings, labelled and rewarded by SmolLM2-135M
itself (the policy's size) vs by Qwen2.5-Coder-1.5B, scored on the same rule-based held-out
measures.

It takes a finished quickstart run (its SFT policy and its 1.5B-labelled PPO are one arm),
copies the SFT policy into a sibling run directory and runs the remaining stages there with
only the labeler's model changed (every other setting as the quickstart's, the threshold and
temperature fitted for the 1.5B included: the comparison is of models, not of tuning):

    python benchmarks/labeler_size.py --run runs/quickstart-run-...     # ~9 min on 2 cores

The table: each arm's rule-scored refusal rate on held-out harmful prompts and answer rate
on benign ones (start, final, the paired change with its 95% CI), the labeler's agreement
with people on held-out pairs, and its win rate (each arm judged by its own labeler: not
comparable across arms, shown for completeness). Written to
``benchmarks/results/labeler_size.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def arm(summary: dict) -> dict:
    p = summary["ppo"]
    return {k: p.get(k) for k in ("refusal_rate_harmful", "answer_rate_benign", "judge_agreement",
                                  "judge_agreement_ci95", "judge_gold_pairs", "judge_gold_source",
                                  "win_rate_vs_start", "win_rate_ci95", "win_rate_prompts", "identical_answers",
                                  "judge", "heldout_reward_curve", "wall_time_s")}


def labeler_model(run: Path) -> str:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    model = ((cfg.get("labeler") or {}).get("backend") or {}).get("model") or cfg.get("model") or {}
    return model.get("name", "?") if isinstance(model, dict) else str(model)


def fmt_change(m: dict | None) -> str:
    if not m:
        return "n/a"
    c = m["change"]
    return (f"{m['start']['rate']:.1%} → {m['final']['rate']:.1%} (change {c['difference']:+.1%} "
            f"[{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}], n={m['final']['n']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished quickstart run directory (the larger labeler's arm)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--labeler", default="smollm2-135m-instruct", help="the other arm's labeler model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "labeler_size.json"))
    args = ap.parse_args()
    big = Path(args.run)
    for need in ("final/sft/config.json", "summary.json"):
        if not (big / need).is_file():
            raise SystemExit(f"{big / need} is missing: pass a finished quickstart run (`make quickstart`)")
    big_summary = json.loads((big / "summary.json").read_text())
    if "ppo" not in big_summary:
        raise SystemExit(f"{big}: the run has no PPO result yet")
    small = big.parent / f"{big.name}-labeler-{args.labeler}"
    if not (small / "summary.json").is_file() or "ppo" not in json.loads((small / "summary.json").read_text()):
        (small / "final").mkdir(parents=True, exist_ok=True)
        if not (small / "final" / "sft" / "config.json").is_file():
            shutil.copytree(big / "final" / "sft", small / "final" / "sft", dirs_exist_ok=True)
        cmd = [sys.executable, "-m", "rayalign.cli", "run", args.config,
               f"labeler.backend.model.name={args.labeler}", "--run-dir", str(small)]
        print("+", " ".join(cmd), flush=True)
        t = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"{args.labeler} arm: {time.time() - t:.0f} s", flush=True)
    small_summary = json.loads((small / "summary.json").read_text())
    # Keyed by the run: the labeler's method string names no model, so both arms share it.
    arms = {}
    for title, run, summ in (("larger labeler (the quickstart run)", big, big_summary),
                             (f"{args.labeler} labeler", small, small_summary)):
        arms[title] = {"run": str(run), "labeler_model": labeler_model(run),
                       "labeler": summ.get("label", {}).get("labeler"), **arm(summ)}
    print()
    for title, a in arms.items():
        print(f"## {title}: {a['labeler_model']} ({a['labeler']})")
        print(f"  refusal on held-out harmful: {fmt_change(a['refusal_rate_harmful'])}")
        print(f"  answer on held-out benign:   {fmt_change(a['answer_rate_benign'])}")
        if a["judge_agreement"] is not None:
            lo, hi = a["judge_agreement_ci95"]
            print(f"  labeler agreement with people: {a['judge_agreement']:.1%} [{lo:.1%}, {hi:.1%}] "
                  f"on {a['judge_gold_pairs']} pairs of {a['judge_gold_source']}")
    import torch

    out = {"arms": arms, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
