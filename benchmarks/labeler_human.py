"""Labeler methods measured on human-labelled pairs (``rayalign.human_pairs``): agreement with
the people's gold label, its 95% Wilson interval, per category.

    python benchmarks/labeler_human.py --split dev      # choose on this half
    python benchmarks/labeler_human.py --split heldout  # report only, after choosing

One in-process SmolLM2-135M-Instruct judge (the quickstart's). Every judgement a method needs
is computed once into a feature cache (``--cache``; a rerun computes only what is missing),
then each method is scored from it:
* pointwise Yes/No questions (the overall "helpful, honest and harmless?" question, and per-criterion questions asked
  after one encoding of the response: ``FrozenLMWorker.question_logprobs``), their means;
* content-free calibration (the same question about an "N/A" response): it cancels within a
  pair for these linear combinations, so it is measured as the pooled AUC of P(good) across
  prompts (what a reward across prompts needs), not only as pair agreement;
* length debiasing (log(1 + words) with a coefficient), the relevance (PMI) term;
* few-shot exemplars drawn from the dev half (``--subset`` pairs, the exemplars' own pairs
  excluded), and pairwise "1"/"2" with position swap (same subset).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rayalign import human_pairs  # noqa: E402
from rayalign.algos.preference import swap_average, two_way_softmax  # noqa: E402
from rayalign.algos.stats import auc, paired_difference, rate  # noqa: E402
from rayalign.labeler.judge import CONTENT_FREE, response_length  # noqa: E402
from rayalign.labeler.templates import CRITERIA, PRESETS  # noqa: E402

T = PRESETS["helpfulness"]
QUESTIONS = {"overall": T.pointwise_question, **CRITERIA,
             "bad": "Is the response irrelevant to the question, harmful or dangerous? Answer Yes or No."}
FEW_SHOT = 4


def features(worker, rows: list[dict], cache: dict, subset: set[str], shots: str) -> None:
    key = lambda c, x: json.dumps([c, x])  # noqa: E731
    items = sorted({(r["prompt"], r[f"response_{k}"]) for r in rows for k in (1, 2)} |
                   {(r["prompt"], CONTENT_FREE) for r in rows})
    todo = [it for it in items if "q" not in cache.get(key(*it), {})]
    if todo:
        t = time.time()
        res = worker.question_logprobs([T.pointwise_sample_text(c, x) for c, x in todo],
                                       ["\n\n" + q for q in QUESTIONS.values()], ["Yes", "No"], 8)
        for it, r in zip(todo, res):
            cache.setdefault(key(*it), {})["q"] = {n: lp[0] - lp[1] for n, lp in zip(QUESTIONS, r)}
        print(f"questions: {len(todo)} items in {time.time() - t:.0f}s", flush=True)
    todo = [it for it in items if it[1] != CONTENT_FREE and "cont" not in cache[key(*it)]]
    if todo:
        t = time.time()
        cl = worker.continuation_logprobs([y for c, x in todo for y in ((c, x), (T.relevance_neutral_prompt, x))], 8)
        for i, it in enumerate(todo):
            cache[key(*it)]["cont"] = [cl[2 * i][0], cl[2 * i][1], cl[2 * i + 1][0]]
        print(f"relevance: {len(todo)} items in {time.time() - t:.0f}s", flush=True)
    sub = [r for r in rows if r["id"] in subset]
    todo = [it for it in sorted({(r["prompt"], r[f"response_{k}"]) for r in sub for k in (1, 2)})
            if "shot" not in cache[key(*it)]]
    if todo:
        t = time.time()
        res = worker.question_logprobs([shots + T.pointwise_sample_text(c, x) for c, x in todo],
                                       ["\n\n" + T.pointwise_question], ["Yes", "No"], 8)
        for it, r in zip(todo, res):
            cache[key(*it)]["shot"] = r[0][0] - r[0][1]
        print(f"few-shot: {len(todo)} items in {time.time() - t:.0f}s", flush=True)
    todo = [r for r in sub if "pairwise" not in cache.get(r["id"], {})]
    if todo:
        t = time.time()
        texts = [T.pairwise_text(r["prompt"], a, b) for r in todo
                 for a, b in ((r["response_1"], r["response_2"]), (r["response_2"], r["response_1"]))]
        lps = worker.option_logprobs([(x, ["1", "2"]) for x in texts], 8)
        for i, r in enumerate(todo):
            cache.setdefault(r["id"], {})["pairwise"] = [two_way_softmax(*lps[2 * i]), two_way_softmax(*lps[2 * i + 1])]
        print(f"pairwise: {len(todo)} pairs x 2 orders in {time.time() - t:.0f}s", flush=True)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-max(-60.0, min(60.0, x))))


def method_scores(cache: dict, rows: list[dict]) -> dict:
    """Each method as a function pair -> P(response_1 better)."""
    def z(c, x, names, cf=False, length=0.0, rel=0.0):
        d = cache[json.dumps([c, x])]
        v = sum(d["q"][n] * (-1 if n == "bad" else 1) for n in names) / len(names)
        if cf:
            n0 = cache[json.dumps([c, CONTENT_FREE])]["q"]
            v -= sum(n0[n] * (-1 if n == "bad" else 1) for n in names) / len(names)
        if rel:
            a, nt, b = d["cont"]
            v += rel * (a - b) / max(1, nt)
        return v - length * response_length(x)

    def pw(names, **kw):
        return lambda r: sig(z(r["prompt"], r["response_1"], names, **kw) - z(r["prompt"], r["response_2"], names, **kw))
    crit3 = ["helpful", "honest", "harmless"]
    m = {
        "pointwise: overall HHH question": pw(["overall"]),
        "pointwise: 'irrelevant, harmful or dangerous?' (old default, no relevance)": pw(["bad"]),
        "pointwise: old default ('bad' question + relevance 1)": pw(["bad"], rel=1.0),
        "pointwise: overall + relevance 1": pw(["overall"], rel=1.0),
        "pointwise: relevance (PMI) alone": pw(["overall"], rel=1e4),
        "pointwise: helpful": pw(["helpful"]), "pointwise: honest": pw(["honest"]),
        "pointwise: harmless": pw(["harmless"]), "pointwise: correct": pw(["correct"]),
        "pointwise: good": pw(["good"]),
        "per-criterion mean: helpful+honest+harmless": pw(crit3),
        "per-criterion mean: helpful+honest+harmless+overall": pw(crit3 + ["overall"]),
        "per-criterion mean: all five + overall": pw(list(CRITERIA) + ["overall"]),
        "overall, length debiased (coef +0.5)": pw(["overall"], length=0.5),
        "overall, length debiased (coef -0.5)": pw(["overall"], length=-0.5),
        "overall, content-free calibrated": pw(["overall"], cf=True),
    }
    sub = {
        f"overall, {FEW_SHOT}-shot (exemplars from dev)": lambda r: sig(
            cache[json.dumps([r["prompt"], r["response_1"]])]["shot"] - cache[json.dumps([r["prompt"], r["response_2"]])]["shot"]),
        "pairwise '1'/'2' with swap": lambda r: swap_average(*cache[r["id"]]["pairwise"]),
        "pairwise '1'/'2', first order only": lambda r: cache[r["id"]]["pairwise"][0],
        "overall HHH question (same subset)": pw(["overall"]),
    }
    return m, sub


def score(rows: list[dict], fn) -> dict:
    hits = [(1 if fn(r) > 0.5 else 2 if fn(r) < 0.5 else 0) == r["gold"] for r in rows]
    by: dict[str, list[bool]] = {}
    for r, h in zip(rows, hits):
        by.setdefault(r["category"], []).append(h)
    out = rate(sum(hits), len(hits))
    out["by_category"] = {c: rate(sum(v), len(v)) for c, v in sorted(by.items())}
    out["hits"] = hits
    return out


def pairwise_main(args) -> None:
    """``--methods pairwise``: the pairwise judge alone (both orders of every pair), for judges
    too large to ask every pointwise question of every response on this machine. Each
    combination of the two orders is scored from one feature cache; the temperature of the
    log-odds combination is fitted on the dev split only and read from its results file for
    the held-out split."""
    from rayalign.algos.preference import expected_calibration_error, fit_temperature, reliability, swap_logodds
    from rayalign.data import load_rows
    from rayalign.models import cache_root

    source = args.source or f"packaged:mc-pairs-{args.split}"
    rows = load_rows(source, ["prompt", "response_1", "response_2"], None, 0)
    rows = [r for r in rows if r.get("gold") in (1, 2)]
    if args.limit:
        rows = rows[:args.limit]
    tag = args.model.replace("/", "_")
    ttag = "" if T.name == "helpfulness" else f"_{T.name}"
    cache_path = Path(args.cache or cache_root() / "data" /
                      f"pairwise_features_{tag}{ttag}_{source.split(':')[-1]}.json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    todo = [r for r in rows if r["id"] not in cache]
    t0 = time.time()
    if todo:
        from rayalign.cluster.group import LocalGroup
        from rayalign.workers.frozen import FrozenLMWorker

        grp = LocalGroup("labeler", FrozenLMWorker, threads=args.threads)
        info = grp.init_model({"name": args.model, "dtype": args.dtype}, {}, True)
        print(f"judge {args.model}: {info['dtype']} ({info['dtype_reason']})", flush=True)
        for k in range(0, len(todo), 32):
            chunk = todo[k:k + 32]
            texts = [T.pairwise_text(r["prompt"], a, b) for r in chunk
                     for a, b in ((r["response_1"], r["response_2"]), (r["response_2"], r["response_1"]))]
            lps = grp.worker.option_logprobs([(x, list(T.options)) for x in texts], 8)
            for i, r in enumerate(chunk):
                cache[r["id"]] = [lps[2 * i][0] - lps[2 * i][1], lps[2 * i + 1][0] - lps[2 * i + 1][1]]
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache))
            done = k + len(chunk)
            print(f"pairwise: {done}/{len(todo)} pairs x 2 orders, {(time.time() - t0) / done:.2f} s per pair",
                  flush=True)
        grp.kill()
    l12 = [cache[r["id"]][0] for r in rows]
    l21 = [cache[r["id"]][1] for r in rows]
    gold1 = [r["gold"] == 1 for r in rows]
    s = [swap_logodds(a, b) for a, b in zip(l12, l21)]
    dev_file = Path(args.dev_out.format(model=tag))
    if args.split == "dev":
        temp = fit_temperature(s, gold1)
    else:
        if not dev_file.is_file():
            raise SystemExit(f"{dev_file} is missing: run --split dev first (the temperature is fitted there)")
        temp = json.loads(dev_file.read_text())["fitted_temperature"]
    sig1 = lambda x: 1 / (1 + math.exp(-max(-60.0, min(60.0, x))))  # noqa: E731
    methods = {
        "pairwise, first order only": [sig1(a) for a in l12],
        "pairwise with swap, probabilities averaged (the old combination)":
            [swap_average(sig1(a), sig1(b)) for a, b in zip(l12, l21)],
        "pairwise with swap, log-odds averaged (position prior cancels)": [sig1(x) for x in s],
        f"pairwise with swap, log-odds averaged, temperature {temp:.3g} (fitted on dev)": [sig1(x / temp) for x in s],
    }
    table = {}
    for name, ps in methods.items():
        hits = [(p > 0.5) == g if p != 0.5 else False for p, g in zip(ps, gold1)]
        table[name] = rate(sum(hits), len(hits)) | {
            "ece": expected_calibration_error(ps, gold1), "mean_confidence": sum(max(p, 1 - p) for p in ps) / len(ps)}
        tasks: dict[str, list[bool]] = {}
        for r, h in zip(rows, hits):
            tasks.setdefault(r.get("task", "all"), []).append(h)
        table[name]["by_task"] = {c: rate(sum(v), len(v)) for c, v in sorted(tasks.items())}
    same = sum((a > 0) == (b > 0) for a, b in zip(l12, l21)) / len(rows)
    slot1 = sum(a > 0 for a in l12) / len(rows)
    print(f"\n{args.split}: {len(rows)} pairs of {source}; judge {args.model}")
    print(f"position bias (same slot in both orders) {same:.1%}; slot 1 chosen in the first order {slot1:.1%}")
    w = max(map(len, table))
    for name, t in table.items():
        print(f"{name:<{w}}  {t['rate']:.1%} [{t['ci95'][0]:.1%}, {t['ci95'][1]:.1%}]  ECE {t['ece']:.3f}  "
              f"mean confidence {t['mean_confidence']:.2f}")
    import torch

    out = {"split": args.split, "source": source, "pairs": len(rows), "judge": args.model, "template": T.name,
           "methods": table,
           "fitted_temperature": temp, "position_bias_rate": same, "slot1_rate_first_order": slot1,
           "seconds": time.time() - t0, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {args.threads} threads",
           "torch": torch.__version__,
           "reliability": reliability([sig1(x / temp) for x in s], gold1)}
    path = Path(args.out.format(split=args.split, model=tag))
    path.write_text(json.dumps(out, indent=1))
    from rayalign.pipelines.label import plot_reliability

    print(f"reliability diagram: {plot_reliability(out['reliability'], path.with_suffix('.png'))}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", choices=human_pairs.SPLITS, required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the judge: a packaged model or HF directory")
    ap.add_argument("--dtype", default="auto", help="the judge's dtype (auto: bf16 where the CPU has native bf16)")
    ap.add_argument("--methods", choices=["all", "pairwise"], default="all",
                    help="all: every pointwise and pairwise method on BIG-bench's pairs (SmolLM2); pairwise: "
                         "the pairwise judge alone, on --source")
    ap.add_argument("--source", default=None, help="--methods pairwise: gold pairs (default packaged:mc-pairs-SPLIT)")
    ap.add_argument("--limit", type=int, default=0, help="--methods pairwise: the first N pairs only")
    ap.add_argument("--template", default="helpfulness", help="--methods pairwise: the labeler template preset "
                    "(helpfulness: the rater preamble, '1'/'2'; helpfulness-ab: a plain question, 'A'/'B')")
    ap.add_argument("--cache", default=None, help="feature cache (default: in rayalign's cache; it holds "
                    "BIG-bench text, which is never committed)")
    ap.add_argument("--subset", type=int, default=200, help="pairs for few-shot and pairwise (slower)")
    ap.add_argument("--out", default="benchmarks/results/labeler_human_{split}.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.methods == "pairwise":
        global T
        T = PRESETS[args.template]
        suffix = "" if args.template == "helpfulness" else f"_{args.template}"
        # The temperature is always the one fitted on mc-pairs-dev: another source is only ever scored.
        args.dev_out = "benchmarks/results/labeler_pairwise_{model}" + suffix + "_dev.json"
        if args.source and args.split == "dev":
            raise SystemExit("--source is scored with the temperature fitted on mc-pairs-dev: use --split heldout")
        if args.out == ap.get_default("out"):
            src = "" if not args.source else "_" + args.source.split(":")[-1]
            args.out = "benchmarks/results/labeler_pairwise_{model}" + suffix + src + "_{split}.json"
        return pairwise_main(args)
    rows = human_pairs.load(args.split)
    dev = human_pairs.load("dev")
    rng = random.Random(0)
    shot_pairs = rng.sample(dev, FEW_SHOT)
    shots = "".join(f"{T.pointwise_sample_text(p['prompt'], p[f'response_{g}'])}\n{T.pointwise_question} {a}\n\n"
                    for i, p in enumerate(shot_pairs)
                    for g, a in [((p["gold"], "Yes") if i % 2 == 0 else (3 - p["gold"], "No"))])
    excluded = {p["id"] for p in shot_pairs}
    rows = [r for r in rows if r["id"] not in excluded]
    subset = {r["id"] for r in random.Random(1).sample(rows, min(args.subset, len(rows)))}
    from rayalign.models import cache_root

    cache_path = Path(args.cache or cache_root() / "data" / f"labeler_features_{args.split}.json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    from rayalign.cluster.group import LocalGroup
    from rayalign.workers.frozen import FrozenLMWorker

    grp = LocalGroup("labeler", FrozenLMWorker, threads=args.threads)
    grp.init_model({"name": "smollm2-135m-instruct"}, {}, True)
    t0 = time.time()
    features(grp.worker, rows, cache, subset, shots)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_text(json.dumps(cache))
    grp.kill()

    full, sub = method_scores(cache, rows)
    base = score(rows, full["pointwise: overall HHH question"])
    table = {}
    counts = ", ".join(f"{c} {v['n']}" for c, v in base["by_category"].items())
    print(f"\n{args.split}: {len(rows)} human-labelled pairs ({counts})")
    for name, fn in full.items():
        s = score(rows, fn)
        only_b = sum(h and not b for h, b in zip(s["hits"], base["hits"]))
        only_a = sum(b and not h for h, b in zip(s["hits"], base["hits"]))
        s["vs_overall_question"] = paired_difference(only_b, only_a, len(rows))
        table[name] = s
    srows = [r for r in rows if r["id"] in subset]
    for name, fn in sub.items():
        table[name + f" [{len(srows)}-pair subset]"] = score(srows, fn)
    # Pooled AUC: does P(good) rank chosen above rejected responses across different prompts?
    def pooled(names, cf):
        def zz(c, x):
            d = cache[json.dumps([c, x])]["q"]
            v = sum(d[n] for n in names) / len(names)
            if cf:
                v -= sum(cache[json.dumps([c, CONTENT_FREE])]["q"][n] for n in names) / len(names)
            return v
        pos = [zz(r["prompt"], r[f"response_{r['gold']}"]) for r in rows]
        neg = [zz(r["prompt"], r[f"response_{3 - r['gold']}"]) for r in rows]
        return auc(pos, neg)
    aucs = {"overall": pooled(["overall"], False), "overall, content-free calibrated": pooled(["overall"], True),
            "helpful+honest+harmless+overall": pooled(["helpful", "honest", "harmless", "overall"], False),
            "helpful+honest+harmless+overall, content-free calibrated":
                pooled(["helpful", "honest", "harmless", "overall"], True)}
    w = max(map(len, table))
    for name, s in table.items():
        cats = " ".join(f"{c} {v['rate']:.0%}" for c, v in s["by_category"].items())
        d = s.get("vs_overall_question")
        dd = f"  Δ {d['difference']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]" if d else ""
        print(f"{name:<{w}}  {s['rate']:.1%} [{s['ci95'][0]:.1%}, {s['ci95'][1]:.1%}]  {cats}{dd}")
    print("pooled AUC of P(good) across prompts:", {k: round(v, 3) for k, v in aucs.items()})
    for s in table.values():
        s.pop("hits")
    import torch

    out = {"split": args.split, "pairs": len(rows), "judge": "smollm2-135m-instruct (fp32)",
           "few_shot_exemplar_ids": sorted(excluded), "methods": table, "pooled_auc": aucs,
           "seconds": time.time() - t0, "command": " ".join(sys.argv),
           "machine": f"{platform.machine()}, {args.threads} threads", "torch": torch.__version__}
    Path(args.out.format(split=args.split)).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
