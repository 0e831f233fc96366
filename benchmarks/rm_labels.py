"""Does the reward model learn more from calibrated soft labels? The same RM, the same pairs,
the same steps; only the form of the judge's label changes:

* ``calibrated``: both orders' log-odds averaged, divided by the temperature fitted on
  mc-pairs-dev (the quickstart's labeler: ``swap_combine: logodds``, ``temperature``);
* ``averaged``: the two orders' probabilities averaged (the combination the labeler used
  before: with a strong position prior every label sits near 0.5);
* ``people``: the gold label itself (1 or 0), as a ceiling for these pairs and this RM.

The judge's log-odds come from ``benchmarks/labeler_human.py --split heldout --methods pairwise``
(its feature cache), so no judge runs here. ``packaged:mc-pairs-heldout`` is cut by a hash of
each pair's id into a half the RM trains on (the judge's labels; people's never reach the two
judge arms) and a half scored against people. No choice is made on either half: the settings
are the quickstart's RM settings, fixed before this was run.

    python benchmarks/rm_labels.py --model qwen2.5-coder-1.5b-instruct --template helpfulness-ab

Each arm is trained with three seeds (batch order and head init); the table gives each seed's
accuracy against people with its 95% CI and the paired difference to ``averaged`` (same
pairs, same seed). Written to ``benchmarks/results/rm_labels.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayalign import data, models  # noqa: E402
from rayalign.algos.preference import swap_average, swap_logodds  # noqa: E402
from rayalign.algos.stats import paired_difference, rate  # noqa: E402


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-max(-60.0, min(60.0, x))))


def soft_labels(l12: float, l21: float, temperature: float) -> dict[str, float]:
    """P(response 1 is better) in each form, from the judge's log-odds in both orders
    (``l12``: log P(1)/P(2) with response 1 shown first; ``l21``: the same with it second)."""
    return {"calibrated": sigmoid(swap_logodds(l12, l21) / temperature),
            "averaged": swap_average(sigmoid(l12), sigmoid(l21))}


def half_of(pair_id: str) -> str:
    return ("train", "eval")[int(hashlib.sha256(f"rm-labels:{pair_id}".encode()).hexdigest(), 16) % 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct", help="the judge whose labels are compared")
    ap.add_argument("--template", default="helpfulness-ab")
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"), help="its rm section is used")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rm_labels.json"))
    args = ap.parse_args()

    from rayalign.cluster.group import LocalGroup
    from rayalign.config import load_config
    from rayalign.models import cache_root
    from rayalign.pipelines.sft import batch_for_step
    from rayalign.workers.reward import RewardWorker

    tag, ttag = args.model.replace("/", "_"), "" if args.template == "helpfulness" else f"_{args.template}"
    feats = cache_root() / "data" / f"pairwise_features_{tag}{ttag}_mc-pairs-heldout.json"
    dev = ROOT / "benchmarks" / "results" / f"labeler_pairwise_{tag}{ttag}_dev.json"
    for f, how in ((feats, "--split heldout"), (dev, "--split dev")):
        if not f.is_file():
            raise SystemExit(f"{f} is missing: run `python benchmarks/labeler_human.py --methods pairwise "
                             f"--model {args.model} --template {args.template} {how}` first")
    cache = json.loads(feats.read_text())
    temperature = json.loads(dev.read_text())["fitted_temperature"]
    rows = [r for r in data.load_rows("packaged:mc-pairs-heldout", ["prompt", "response_1", "response_2"])
            if r["id"] in cache]
    if len(rows) < 100:
        raise SystemExit(f"only {len(rows)} held-out pairs have judge features in {feats}: finish the "
                         "labeler_human.py --split heldout run first")

    cfg = load_config(args.config)
    mcfg, t, dcfg = cfg.rm_model(), cfg.rm.train, cfg.rm.data
    tok = models.load_tokenizer(models.resolve(mcfg.name, mcfg.seed, mcfg.overrides))

    def enc(r: dict, p: float) -> dict:
        return {"ids_1": data.encode_rm(tok, r["prompt"], r["response_1"], dcfg.max_length),
                "ids_2": data.encode_rm(tok, r["prompt"], r["response_2"], dcfg.max_length), "p": p}

    train_rows = [r for r in rows if half_of(r["id"]) == "train"]
    eval_rows = [r for r in rows if half_of(r["id"]) == "eval"]
    gold_eval = [enc(r, 1.0 if r["gold"] == 1 else 0.0) for r in eval_rows]
    arms: dict[str, list[dict]] = {"calibrated": [], "averaged": [], "people": []}
    for r in train_rows:
        s = soft_labels(*cache[r["id"]], temperature)
        e = enc(r, 1.0 if r["gold"] == 1 else 0.0)  # tokenised once; the arms differ only in p
        arms["people"].append(e)
        arms["calibrated"].append(e | {"p": s["calibrated"]})
        arms["averaged"].append(e | {"p": s["averaged"]})
    label_stats = {}
    for name in ("calibrated", "averaged"):
        ps = [x["p"] for x in arms[name]]
        right = [(x["p"] > 0.5) == (r["gold"] == 1) for x, r in zip(arms[name], train_rows)]
        label_stats[name] = {"mean_confidence": sum(max(p, 1 - p) for p in ps) / len(ps),
                             "confident_share": sum(abs(p - 0.5) >= 0.25 for p in ps) / len(ps),
                             "agreement_with_people": rate(sum(right), len(right))}
    print(f"{len(train_rows)} train pairs (judge labels), {len(eval_rows)} eval pairs (people); "
          f"temperature {temperature:.3g}", flush=True)
    for name, st in label_stats.items():
        print(f"  {name:<10} labels: mean confidence {st['mean_confidence']:.3f}, "
              f"|p - 0.5| >= 0.25 on {st['confident_share']:.0%}, "
              f"right side {st['agreement_with_people']['rate']:.1%}", flush=True)

    steps = max(1, len(train_rows) // t.batch_size) * t.epochs
    results: dict[str, list[dict]] = {k: [] for k in arms}
    hits: dict[tuple[str, int], list[bool]] = {}
    t0 = time.time()
    for seed in range(args.seeds):
        for name, pairs in arms.items():
            grp = LocalGroup("reward", RewardWorker, threads=args.threads)
            try:
                grp.init_model(mcfg.model_dump(), cfg.rm.group.zero.model_dump(),
                               t.model_dump() | {"seed": seed}, steps, None)
                grp.set_loss(cfg.rm.loss.model_dump())
                for step in range(steps):
                    grp.train_step(batch_for_step(pairs, step, t.batch_size, seed), t.batch_size)
                sc = grp.score_pairs(gold_eval)
            finally:
                grp.kill()
            h = [(a > b) == (g["p"] > 0.5) for a, b, g in zip(sc["r1"], sc["r2"], gold_eval)]
            hits[(name, seed)] = h
            results[name].append({"seed": seed} | rate(sum(h), len(h)))
            print(f"seed {seed} {name:<10} accuracy against people {sum(h) / len(h):.1%} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    for name in arms:
        for res in results[name]:
            a, b = hits[("averaged", res["seed"])], hits[(name, res["seed"])]
            res["vs_averaged"] = paired_difference(sum(y and not x for x, y in zip(a, b)),
                                                   sum(x and not y for x, y in zip(a, b)), len(a))
    print("\narm         seed  accuracy against people [95% CI]   vs averaged [95% CI]")
    for name, rs in results.items():
        for r in rs:
            d = r["vs_averaged"]
            print(f"{name:<11} {r['seed']:>4}  {r['rate']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]"
                  f"          {d['difference']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]")
    import torch

    out = {"judge": args.model, "template": args.template, "temperature": temperature,
           "train_pairs": len(train_rows), "eval_pairs": len(eval_rows), "rm_model": mcfg.name,
           "rm_train": t.model_dump(), "steps": steps, "label_stats": label_stats, "results": results,
           "seconds": time.time() - t0, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {args.threads} threads", "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
