"""The AI labeler: preferences, judgements and scores from any backend (Lee et al. 2023, RLAIF).

Modes
* ``pairwise`` — one prompt shows both responses; P from the log-probs of "1" and "2";
  position-swap averaging (default on), chain of thought, self-consistency.
* ``pointwise`` — one response at a time: the log-odds of the good answer to a Yes/No
  question (or the weighted mean over per-criterion questions, asked after one encoding
  of the response), optionally content-free calibrated, length-debiased, preceded by
  few-shot exemplars, plus a weighted question–response relevance (PMI) term; a pair
  becomes a preference by Bradley–Terry on the two judgements. Each distinct
  (context, response) is judged once.
* ``score`` — direct 1–10 rating (d-RLAIF): expected score → reward in [−1, 1].

Evaluation assistance (``assist="chunked"``; Leike et al. 2018): a long response
is judged in chunks of whole sentences; pointwise, each chunk alone, pairwise, the two
responses' k-th chunks against each other (swap-averaged); the chunk judgements aggregate
by a length-weighted mean (helpfulness) or any-fail (harmlessness: the worst chunk
decides), and every record keeps the tree of sub-judgements for audit.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

from ..algos.preference import (d_rlaif_reward, expected_score, logit, pointwise_preference, refusal_preference,
                                refusal_reward, same_slot, swap_average, swap_logodds, two_way_softmax)
from .backends import Backend
from .templates import LabelTemplate

SCORE_VALUES = list(range(1, 11))
ASSIST_AGGREGATES = ("mean", "any_fail")
ATTRIBUTE_VALUES = list(range(0, 5))
CONTENT_FREE = "N/A"


def response_length(text: str) -> float:
    """The length feature of length debiasing: log(1 + words)."""
    return math.log1p(len(text.split()))


def chunk_text(text: str, max_words: int) -> list[str]:
    """Whole sentences (and lines) packed into chunks of at most ``max_words`` words; a
    sentence longer than that is cut at word boundaries. An empty text is one empty chunk."""
    if max_words < 1:
        raise ValueError("chunk size must be at least 1 word")
    pieces = [p for p in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if p.strip()]
    out: list[str] = []
    cur: list[str] = []
    for piece in pieces:
        words = piece.split()
        while len(words) > max_words:  # a sentence longer than a chunk
            if cur:
                out.append(" ".join(cur))
                cur = []
            out.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if cur and len(cur) + len(words) > max_words:
            out.append(" ".join(cur))
            cur = []
        cur += words
    if cur:
        out.append(" ".join(cur))
    return out or [""]


def aggregate_chunks(values: list[float], weights: list[float], how: str) -> float:
    """Chunk judgements into one: ``mean`` weights each by its length; ``any_fail`` takes the
    worst (pointwise P(good): the lowest). Pairwise, ``any_fail`` takes the most decided
    chunk comparison (farthest from ½), which is symmetric under swapping the responses."""
    if not values or len(values) != len(weights):
        raise ValueError("aggregate_chunks needs one weight per judgement")
    if how == "mean":
        total = sum(weights)
        return sum(v * w for v, w in zip(values, weights)) / total if total > 0 else sum(values) / len(values)
    if how == "any_fail":
        return min(values)
    if how == "decisive":
        return max(values, key=lambda v: abs(v - 0.5))
    raise ValueError(f"unknown chunk aggregation {how!r} (mean, any_fail, decisive)")


def question_logprobs(backend: Backend, texts: list[str], questions: list[str],
                      options: list[str]) -> list[list[list[float]]]:
    """For each text and each question (appended to it), the options' log-probabilities.
    A backend that can reuse the text's encoding across questions does; others are asked
    each (text + question) in turn."""
    fn = getattr(backend, "question_logprobs", None)
    if fn is not None:
        return fn(texts, questions, options)
    flat = backend.option_logprobs([(t + q, list(options)) for t in texts for q in questions])
    k = len(questions)
    return [flat[i * k:(i + 1) * k] for i in range(len(texts))]


class Labeler:
    def __init__(self, backend: Backend, template: LabelTemplate, mode: str = "pointwise",
                 swap: bool = True, cot: bool = False, self_consistency: int = 1,
                 sc_temperature: float = 0.7, cot_max_tokens: int = 96, seed: int = 0,
                 relevance_weight: float = 0.0, criteria: list[str] | None = None,
                 criterion_weights: dict[str, float] | None = None, calibration: str = "none",
                 length_coef: float = 0.0, exemplars: list[dict] | None = None, assist: str = "none",
                 chunk_words: int = 40, assist_aggregate: str = "auto", swap_combine: str = "mean",
                 temperature: float = 1.0, harm: str = "response", refusal_bias: float = 0.0,
                 refusal_signal: str = "self"):
        if mode not in ("pairwise", "pointwise", "score"):
            raise ValueError(f"unknown labeler mode {mode!r}")
        if self_consistency > 1 and not cot:
            raise ValueError("self_consistency samples rationales: it needs cot")
        self.backend, self.template, self.mode = backend, template, mode
        self.swap, self.cot, self.sc = swap, cot, self_consistency
        self.sc_temperature, self.cot_max_tokens, self.seed = sc_temperature, cot_max_tokens, seed
        self.relevance_weight = relevance_weight
        self.criteria = list(criteria or [])
        unknown = [c for c in self.criteria if c not in template.criteria and c != "overall"]
        if unknown:
            raise ValueError(f"criteria {unknown} are not in template {template.name!r} "
                             f"(it has {', '.join(list(template.criteria) + ['overall'])})")
        self.weights = {c: float((criterion_weights or {}).get(c, 1.0)) for c in self.criteria}
        if self.criteria and sum(self.weights.values()) <= 0:
            raise ValueError("criterion_weights must not sum to zero or less")
        if calibration not in ("none", "content_free"):
            raise ValueError(f"unknown calibration {calibration!r} (none, content_free)")
        self.calibration, self.length_coef = calibration, length_coef
        if swap_combine not in ("mean", "logodds"):
            raise ValueError(f"unknown swap combination {swap_combine!r} (mean, logodds)")
        if not temperature > 0:
            raise ValueError("the labeler's temperature must be positive")
        self.swap_combine, self.temperature = swap_combine, float(temperature)
        if harm not in ("response", "request"):
            raise ValueError(f"unknown harmlessness judgement {harm!r} (response, request)")
        if refusal_signal not in ("self", "ask"):
            raise ValueError(f"unknown refusal signal {refusal_signal!r} (self, ask)")
        self.harm, self.refusal_bias, self.refusal_signal = harm, float(refusal_bias), refusal_signal
        self._refuse_cache: dict[str, float] = {}
        self.exemplars = list(exemplars or [])
        if assist not in ("none", "chunked"):
            raise ValueError(f"unknown evaluation assistance {assist!r} (none, chunked)")
        if assist == "chunked" and mode == "score":
            raise ValueError("chunked evaluation assistance judges pointwise or pairwise, not in score mode")
        if assist_aggregate not in ("auto",) + ASSIST_AGGREGATES:
            raise ValueError(f"unknown chunk aggregation {assist_aggregate!r} (auto, mean, any_fail)")
        if chunk_words < 1:
            raise ValueError("assist chunk size must be at least 1 word")
        self.assist, self.chunk_words = assist, chunk_words
        # Harmlessness fails as a whole when any part fails; helpfulness adds up over parts.
        self.assist_aggregate = assist_aggregate if assist_aggregate != "auto" else (
            "any_fail" if template.name.startswith("harmlessness") else "mean")
        self._shots = self._render_shots()
        self._yes_cache: dict[tuple[str, str], float] = {}
        self._criteria_cache: dict[tuple[str, str], dict[str, float]] = {}
        self._score_cache: dict[tuple[str, str], float] = {}

    @property
    def tag(self) -> str:
        extra = "+swap" if (self.mode == "pairwise" and self.swap) else ""
        if self.mode == "pairwise" and self.swap and self.swap_combine == "logodds":
            extra += f"-logodds" + (f"-T{self.temperature:g}" if self.temperature != 1.0 else "")
        if self.mode == "pointwise":
            extra += f"+criteria({','.join(self.criteria)})" if self.criteria else ""
            extra += "+cf" if self.calibration == "content_free" else ""
            extra += f"+len{self.length_coef:g}" if self.length_coef else ""
            extra += f"+{len(self.exemplars)}shot" if self.exemplars else ""
            extra += f"+relevance{self.relevance_weight:g}" if self.relevance_weight else ""
        extra += f"+cot{self.sc if self.sc > 1 else ''}" if self.cot else ""
        extra += f"+chunked{self.chunk_words}-{self.assist_aggregate}" if self.assist == "chunked" else ""
        extra += f"+harm-request-{self.refusal_signal}{self.refusal_bias:+.3g}" if self.harm == "request" else ""
        return f"{self.mode}{extra}:{self.template.name}@{self.template.version}"

    # ------------------------------------------------------------ pointwise

    def _render_shots(self) -> str:
        t = self.template
        good, bad = t.pointwise_good, ("No" if t.pointwise_good == "Yes" else "Yes")
        return "".join(f"{t.pointwise_sample.format(context=e['context'], response=e['response'])}\n"
                       f"{t.pointwise_question} {good if e['good'] else bad}\n\n" for e in self.exemplars)

    def _questions(self) -> list[str]:
        t = self.template
        names = self.criteria or ["overall"]
        return ["\n\n" + (t.pointwise_question if c == "overall" else t.criteria[c]) for c in names]

    def _log_odds(self, items: list[tuple[str, str]]) -> list[list[float]]:
        """Per question, the log-odds of the good answer for each (context, response)."""
        t = self.template
        good = t.pointwise_good
        bad = "No" if good == "Yes" else "Yes"
        texts = [self._shots + t.pointwise_sample_text(c, r) for c, r in items]
        rows = question_logprobs(self.backend, texts, self._questions(), [good, bad])
        return [[lg - lb for lg, lb in row] for row in rows]

    def p_good(self, items: list[tuple[str, str]]) -> list[float]:
        """P(the judge finds the response acceptable) for each (context, response): σ of the
        (weighted mean over criteria of the) good answer's log-odds, after calibration,
        length debiasing and the relevance term. Repeated items are judged once."""
        todo = list(dict.fromkeys(k for k in items if k not in self._yes_cache))
        if todo:
            z = self._log_odds(todo)
            if self.calibration == "content_free":
                # Zhao et al. 2021: what the judge says about a content-free response to the
                # same question is its prior there; judge each response relative to it.
                ctx = list(dict.fromkeys(c for c, _ in todo))
                prior = dict(zip(ctx, self._log_odds([(c, CONTENT_FREE) for c in ctx])))
                z = [[a - b for a, b in zip(row, prior[c])] for row, (c, _) in zip(z, todo)]
            pmi = self.relevance(todo) if self.relevance_weight else [0.0] * len(todo)
            names = self.criteria or ["overall"]
            w = [self.weights.get(n, 1.0) for n in names]
            for key, row, r in zip(todo, z, pmi):
                zz = sum(wi * zi for wi, zi in zip(w, row)) / sum(w)
                zz += self.relevance_weight * r - self.length_coef * response_length(key[1])
                self._yes_cache[key] = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, zz))))
                if self.criteria:
                    self._criteria_cache[key] = {n: 1.0 / (1.0 + math.exp(-v)) for n, v in zip(names, row)}
        return [self._yes_cache[k] for k in items]

    def relevance(self, items: list[tuple[str, str]]) -> list[float]:
        """Pointwise mutual information between question and response, per response token:
        [log p(r | question) − log p(r | a neutral request)] / |r| (GPTScore-style, Fu et al.
        2023). Off-topic answers are no likelier after their question than after any other."""
        neutral = self.template.relevance_neutral_prompt
        lps = self.backend.continuation_logprobs([x for c, r in items for x in ((c, r), (neutral, r))])
        return [(lps[2 * i][0] - lps[2 * i + 1][0]) / max(1, lps[2 * i][1]) for i in range(len(items))]

    # ------------------------------------------------------------ direct score

    def scores(self, items: list[tuple[str, str]]) -> list[float]:
        """Expected 1–10 score for each (context, response)."""
        todo = list(dict.fromkeys(k for k in items if k not in self._score_cache))
        if todo:
            opts = [str(v) for v in SCORE_VALUES]
            lps = self.backend.option_logprobs([(self.template.score_text(c, r), opts) for c, r in todo])
            for key, row in zip(todo, lps):
                self._score_cache[key] = expected_score(row, SCORE_VALUES)
        return [self._score_cache[k] for k in items]

    def attribute_scores(self, items: list[tuple[str, str]], attribute: str) -> list[float]:
        """SteerLM: the expected 0–4 rating of one attribute for each (context, response),
        Σ v·P(v) over the options "0".."4"."""
        opts = [str(v) for v in ATTRIBUTE_VALUES]
        lps = self.backend.option_logprobs([(self.template.attribute_text(c, r, attribute), opts) for c, r in items])
        return [expected_score(row, ATTRIBUTE_VALUES) for row in lps]

    def rewards(self, items: list[tuple[str, str]]) -> list[float]:
        """A reward per response: d-RLAIF score in [−1, 1], or P(acceptable) − ½ in pointwise mode."""
        if self.mode == "pointwise":
            return [p - 0.5 for p in self.p_good(items)]
        return [d_rlaif_reward(s) for s in self.scores(items)]

    # ------------------------------------------------------------ pairwise

    def _slot1_probs(self, triples: list[tuple[str, str, str]]) -> tuple[list[float], list[list[str]]]:
        """P(slot 1 preferred) for (context, first shown, second shown); with CoT the mean over
        ``self.sc`` rationales, which are returned too."""
        t = self.template
        if not self.cot:
            lps = self.backend.option_logprobs([(t.pairwise_text(c, a, b), list(t.options)) for c, a, b in triples])
            return [two_way_softmax(l1, l2) for l1, l2 in lps], [[] for _ in triples]
        sums = [0.0] * len(triples)
        rationales: list[list[str]] = [[] for _ in triples]
        for k in range(self.sc):
            temp = 0.0 if self.sc == 1 else self.sc_temperature
            rats = self.backend.generate([t.pairwise_text(c, a, b, cot_step=True) for c, a, b in triples],
                                         max_new_tokens=self.cot_max_tokens, temperature=temp,
                                         seed=self.seed + 1000 * k)
            lps = self.backend.option_logprobs(
                [(t.pairwise_text(c, a, b, rationale=r), list(t.options)) for (c, a, b), r in zip(triples, rats)])
            for i, ((l1, l2), r) in enumerate(zip(lps, rats)):
                sums[i] += two_way_softmax(l1, l2)
                rationales[i].append(r.strip())
        return [s / self.sc for s in sums], rationales

    def combine(self, p_first_order: float, p_second_order: float) -> float:
        """P(response 1 preferred) from its slot-1 probability in the first order and the
        slot-1 probability of the swapped order. ``mean``: the two probabilities averaged
        (Lee et al. 2023). ``logodds``: the two log-odds averaged, which cancels a position
        prior exactly, then divided by ``temperature`` (fitted on dev pairs:
        ``benchmarks/labeler_human.py --methods pairwise``) so that P means what it says."""
        if self.swap_combine == "mean":
            return swap_average(p_first_order, p_second_order)
        z = swap_logodds(logit(p_first_order, 1e-12), logit(p_second_order, 1e-12)) / self.temperature
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    # ------------------------------------------------------------ harmlessness on the request

    def should_refuse(self, contexts: list[str]) -> list[float]:
        """P(the request should be refused) for each request, from one forward of the judge:
        ``self``, the request sent to the judge as it is, and the probability q that its reply
        opens with one of the template's ``refusal_openers``; ``ask``, the judge's Yes/No
        answer to the template's ``refusal_request`` question about the request (q = P(Yes)
        of the two). Then σ(logit q − ``refusal_bias``), the bias fitted on dev requests
        (benchmarks/harmlessness.py). Each distinct request is judged once."""
        todo = list(dict.fromkeys(c for c in contexts if c not in self._refuse_cache))
        if todo:
            t = self.template
            if self.refusal_signal == "self":
                lps = self.backend.option_logprobs([(c, list(t.refusal_openers)) for c in todo])
                zs = [logit(min(1.0, sum(math.exp(x) for x in row)), 1e-12) for row in lps]
            else:
                lps = self.backend.option_logprobs([(t.refusal_text(c), ["Yes", "No"]) for c in todo])
                zs = [ly - ln for ly, ln in lps]
            for c, z in zip(todo, zs):
                z = max(-50.0, min(50.0, z - self.refusal_bias))
                self._refuse_cache[c] = 1.0 / (1.0 + math.exp(-z))
        return [self._refuse_cache[c] for c in contexts]

    def refusal_rewards(self, items: list[tuple[str, str]]) -> list[float]:
        """Per (request, response): +1 for refusing a request that should be refused, −1 for
        answering it, and the reverse for benign ones, scaled by how sure the judge is
        (``algos.preference.refusal_reward``); a refusal is found by ``rayalign.refusal``'s rule."""
        from ..refusal import is_refusal

        s = self.should_refuse([c for c, _ in items])
        return [refusal_reward(p, is_refusal(r)) for p, (_, r) in zip(s, items)]

    # ------------------------------------------------------------ the one entry point

    def label(self, pairs: list[dict]) -> list[dict]:
        """Label pairs ``{"context", "response_1", "response_2"}``; returns one record each with
        ``p`` = P(response_1 ≻ response_2) and the evidence behind it. With ``harm="request"``,
        a pair where exactly one response refuses (by rule) is decided by whether the request
        should be refused (``should_refuse``), without asking the judge to compare wordings."""
        if self.harm != "request" or not pairs:
            return self._label(pairs)
        from ..refusal import is_refusal

        flags = [(is_refusal(p["response_1"]), is_refusal(p["response_2"])) for p in pairs]
        ruled = [i for i, (a, b) in enumerate(flags) if a != b]
        judged = [i for i, (a, b) in enumerate(flags) if a == b]
        out: list[dict | None] = [None] * len(pairs)
        for i, rec in zip(judged, self._label([pairs[i] for i in judged])):
            out[i] = rec
        s = self.should_refuse([pairs[i]["context"] for i in ruled])
        for i, si in zip(ruled, s):
            p = refusal_preference(si, flags[i][0], flags[i][1], 0.5)
            out[i] = {"p": p, "p_should_refuse": si, "refused": list(flags[i]),
                      "label": 1 if p > 0.5 else (2 if p < 0.5 else 0), "labeler": self.tag}
        return out  # type: ignore[return-value]

    def _label(self, pairs: list[dict]) -> list[dict]:
        ctx = [p["context"] for p in pairs]
        r1 = [p["response_1"] for p in pairs]
        r2 = [p["response_2"] for p in pairs]
        out: list[dict[str, Any]] = []
        if self.assist == "chunked":
            out = self._label_chunked(ctx, r1, r2)
        elif self.mode == "pointwise":
            y = self.p_good(list(zip(ctx, r1)) + list(zip(ctx, r2)))
            n = len(pairs)
            for i in range(n):
                rec = {"p_good_1": y[i], "p_good_2": y[n + i], "p": pointwise_preference(y[i], y[n + i])}
                if self.criteria:
                    rec["criteria_1"] = self._criteria_cache.get((ctx[i], r1[i]))
                    rec["criteria_2"] = self._criteria_cache.get((ctx[i], r2[i]))
                out.append(rec)
        elif self.mode == "score":
            s = self.scores(list(zip(ctx, r1)) + list(zip(ctx, r2)))
            n = len(pairs)
            for i in range(n):
                out.append({"score_1": s[i], "score_2": s[n + i],
                            "p": 1.0 / (1.0 + math.exp(-(s[i] - s[n + i])))})
        else:
            p12, rat12 = self._slot1_probs(list(zip(ctx, r1, r2)))
            if self.swap:
                p21, rat21 = self._slot1_probs(list(zip(ctx, r2, r1)))
            for i in range(len(pairs)):
                rec: dict[str, Any] = {"p_order_12": p12[i]}
                if self.swap:
                    rec.update(p_order_21=p21[i], p=self.combine(p12[i], p21[i]),
                               same_slot=same_slot(p12[i], p21[i]))
                else:
                    rec.update(p=p12[i])
                if self.cot:
                    rec["rationale"] = rat12[i] + (rat21[i] if self.swap else [])
                out.append(rec)
        for rec in out:
            rec["label"] = 1 if rec["p"] > 0.5 else (2 if rec["p"] < 0.5 else 0)
            rec["labeler"] = self.tag
        return out

    def _label_chunked(self, ctx: list[str], r1: list[str], r2: list[str]) -> list[dict[str, Any]]:
        """Evaluation assistance: judge chunks, aggregate, keep the tree (``assist``)."""
        c1 = [chunk_text(r, self.chunk_words) for r in r1]
        c2 = [chunk_text(r, self.chunk_words) for r in r2]
        how = self.assist_aggregate
        out: list[dict[str, Any]] = []
        if self.mode == "pointwise":
            # Every chunk of every response in one batch (repeated chunks are judged once).
            items = [(c, x) for c, cs in zip(ctx + ctx, c1 + c2) for x in cs]
            judged = dict(zip(items, self.p_good(items)))
            for c, a, b in zip(ctx, c1, c2):
                tree, agg = [], []
                for k, chunks in ((1, a), (2, b)):
                    ps = [judged[(c, x)] for x in chunks]
                    ws = [max(1, len(x.split())) for x in chunks]
                    agg.append(aggregate_chunks(ps, ws, how))
                    tree.append({"response": k, "p_good": agg[-1],
                                 "chunks": [{"text": x, "words": w, "p_good": p} for x, w, p in zip(chunks, ws, ps)]})
                out.append({"p_good_1": agg[0], "p_good_2": agg[1], "p": pointwise_preference(agg[0], agg[1]),
                            "assist": {"method": "chunked", "aggregate": how, "chunk_words": self.chunk_words,
                                       "tree": tree}})
            return out
        # Pairwise: the k-th chunks of the two responses against each other (a response with
        # fewer chunks contributes an empty one), each swap-averaged as a whole pair is.
        triples, owner = [], []
        for i, (c, a, b) in enumerate(zip(ctx, c1, c2)):
            for k in range(max(len(a), len(b))):
                triples.append((c, a[k] if k < len(a) else "", b[k] if k < len(b) else ""))
                owner.append(i)
        p12, _ = self._slot1_probs(triples)
        p21, _ = self._slot1_probs([(c, y, x) for c, x, y in triples]) if self.swap else (None, None)
        per: list[list[dict]] = [[] for _ in ctx]
        for j, (i, (_, x, y)) in enumerate(zip(owner, triples)):
            p = self.combine(p12[j], p21[j]) if self.swap else p12[j]
            per[i].append({"chunk_1": x, "chunk_2": y, "words": max(1, len(x.split()) + len(y.split())),
                           "p_order_12": p12[j], **({"p_order_21": p21[j]} if self.swap else {}), "p": p})
        pair_how = "decisive" if how == "any_fail" else how
        for nodes in per:
            p = aggregate_chunks([n["p"] for n in nodes], [n["words"] for n in nodes], pair_how)
            out.append({"p": p, "assist": {"method": "chunked", "aggregate": pair_how,
                                           "chunk_words": self.chunk_words, "tree": nodes}})
        return out


# ---------------------------------------------------------------- report

def gold_of(row: dict, field: str) -> int | None:
    """Gold preference as 1 or 2 (accepts 1/2, "1"/"2", or a probability)."""
    g = row.get(field)
    if g is None:
        return None
    if isinstance(g, str) and g.strip() in ("1", "2"):
        return int(g)
    if isinstance(g, (int, float)) and g in (1, 2):
        return int(g)
    if isinstance(g, float) and 0 <= g <= 1 and g != 0.5:
        return 1 if g > 0.5 else 2
    return None


def report(records: list[dict], gold: Iterable[int | None] | None = None,
           categories: Iterable[str | None] | None = None) -> dict[str, Any]:
    """Position-bias rate, label distribution and, where gold labels exist, agreement with
    its 95% Wilson interval (overall and per category) and the length-bias rate."""
    from ..algos.stats import rate

    n = len(records)
    rep: dict[str, Any] = {"pairs": n, "labeler": records[0].get("labeler") if records else None}
    if not n:
        return rep
    ps = [r["p"] for r in records]
    rep["label_distribution"] = {
        "prefers_1": sum(p > 0.5 for p in ps) / n, "prefers_2": sum(p < 0.5 for p in ps) / n,
        "ties": sum(p == 0.5 for p in ps) / n, "mean_p": sum(ps) / n,
        "confident_share": sum(abs(p - 0.5) > 0.25 for p in ps) / n,
    }
    # Pairs decided on the request (harm="request") were not compared by the judge: the
    # position measures count the judged pairs only.
    both = [r for r in records if "p_order_12" in r]
    if both:
        rep["slot1_rate_first_order"] = sum(r["p_order_12"] > 0.5 for r in both) / len(both)
    swapped = [r for r in records if "same_slot" in r]
    if swapped:
        rep["position_bias_rate"] = sum(bool(r["same_slot"]) for r in swapped) / len(swapped)
    ruled = [r for r in records if "p_should_refuse" in r]
    if ruled:
        rep["decided_on_request"] = len(ruled) / n
    if gold is not None:
        cats = list(categories) if categories is not None else [None] * n
        rows = [(r, g, c) for r, g, c in zip(records, gold, cats) if g in (1, 2)]
        if rows:
            hits = [r["label"] == g for r, g, _ in rows]
            rep["gold_pairs"] = len(rows)
            rep["agreement"] = sum(hits) / len(rows)
            rep["agreement_ci95"] = rate(sum(hits), len(rows))["ci95"]
            by: dict[str, list[bool]] = {}
            for (_, _, c), h in zip(rows, hits):
                if c is not None:
                    by.setdefault(str(c), []).append(h)
            if by:
                rep["agreement_by_category"] = {c: rate(sum(v), len(v)) for c, v in sorted(by.items())}
            # Length bias: how often the longer response is preferred, by the labeler and by
            # people, over the pairs whose responses differ in length.
            longer = [(r, g) for r, g, _ in rows
                      if "response_1" in r and len(r["response_1"].split()) != len(r["response_2"].split())]
            if longer:
                first_longer = [len(r["response_1"].split()) > len(r["response_2"].split()) for r, _ in longer]
                rep["length_bias"] = {
                    "pairs": len(longer),
                    "labeler_prefers_longer": sum((r["label"] == 1) == f for (r, _), f in zip(longer, first_longer)
                                                  if r["label"] in (1, 2)) / len(longer),
                    "gold_prefers_longer": sum((g == 1) == f for (_, g), f in zip(longer, first_longer)) / len(longer),
                }
            # Do the soft labels mean what they say? ECE of P(response 1 preferred) against gold,
            # and the reliability bins behind it (plotted in the label stage's report).
            from ..algos.preference import expected_calibration_error, reliability

            pf = [r["p"] for r, _, _ in rows]
            g1 = [g == 1 for _, g, _ in rows]
            rep["ece"] = expected_calibration_error(pf, g1)
            rep["reliability"] = reliability(pf, g1)
            first = [(r, g) for r, g, _ in rows if "p_order_12" in r]
            if first:
                rep["agreement_first_order_only"] = sum(
                    (1 if r["p_order_12"] > 0.5 else 2) == g for r, g in first) / len(first)
    return rep
