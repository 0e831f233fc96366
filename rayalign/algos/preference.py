"""Preference math: AI-labeler aggregation and reward-model losses, as pure functions.

References: Lee et al. 2023 (RLAIF, arXiv 2309.00267) for the labeler; Bradley & Terry
1952, Ouyang et al. 2022 and Touvron et al. 2023 (margin) for reward models.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- labeler aggregation

def two_way_softmax(logp_a: float, logp_b: float) -> float:
    """P(a) from the log-probabilities of two candidate tokens: softmax over just those two."""
    m = max(logp_a, logp_b)
    ea, eb = math.exp(logp_a - m), math.exp(logp_b - m)
    return ea / (ea + eb)


def swap_average(p_first_order: float, p_second_order: float) -> float:
    """P(y1 > y2) from both presentation orders (position-bias mitigation).

    ``p_first_order`` = P(slot 1 preferred) with (y1, y2) shown in that order;
    ``p_second_order`` = P(slot 1 preferred) with (y2, y1) shown, so y1 sits in slot 2:
    P(y1 > y2) = ½ [P_(y1,y2)(1) + P_(y2,y1)(2)] = ½ [p1 + (1 − p2)].
    Swapping the inputs maps the result to its complement exactly.
    """
    return 0.5 * (p_first_order + (1.0 - p_second_order))


def same_slot(p_first_order: float, p_second_order: float) -> bool:
    """True when the labeler picks the same *slot* in both orders (position bias):
    slot 1 both times or slot 2 both times."""
    return (p_first_order > 0.5) == (p_second_order > 0.5)


def swap_logodds(logodds_first_order: float, logodds_second_order: float) -> float:
    """Both orders combined in log-odds: ``(ℓ₁₂ − ℓ₂₁) / 2``, where ℓ is the judge's log-odds
    of choosing slot 1 in that order. A position prior (a constant added to every ℓ) cancels
    exactly, where averaging the two probabilities only squashes the result towards ½."""
    return 0.5 * (logodds_first_order - logodds_second_order)


def fit_temperature(scores: Sequence[float], first_preferred: Sequence[bool], lo: float = 0.05,
                    hi: float = 50.0, iters: int = 100) -> float:
    """The T > 0 that maximises the likelihood of the gold labels under P = σ(score / T) (a
    one-parameter Platt scaling: it changes confidence, never the argmax). The negative
    log-likelihood is convex in 1/T, so a ternary search over log T finds it."""
    if len(scores) != len(first_preferred) or not scores:
        raise ValueError("fit_temperature needs one gold label per score, and at least one")

    def nll(t: float) -> float:
        total = 0.0
        for s, g in zip(scores, first_preferred):
            z = (s / t) if g else (-s / t)
            total += math.log1p(math.exp(-z)) if z > -30 else -z
        return total

    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        m1, m2 = a + (b - a) / 3, b - (b - a) / 3
        if nll(math.exp(m1)) <= nll(math.exp(m2)):
            b = m2
        else:
            a = m1
    return math.exp((a + b) / 2)


def reliability(p_first: Sequence[float], first_preferred: Sequence[bool], bins: int = 10) -> list[dict]:
    """The bins behind the ECE: each non-empty bin's count, mean p and gold rate."""
    rows: list[list[float]] = [[0.0, 0.0, 0] for _ in range(bins)]
    for p, g in zip(p_first, first_preferred):
        b = min(bins - 1, int(p * bins))
        rows[b][0] += p
        rows[b][1] += 1.0 if g else 0.0
        rows[b][2] += 1
    return [{"bin": [b / bins, (b + 1) / bins], "n": int(c), "mean_p": sp / c, "gold_rate": sg / c}
            for b, (sp, sg, c) in enumerate(rows) if c]


def expected_calibration_error(p_first: Sequence[float], first_preferred: Sequence[bool],
                               bins: int = 10) -> float:
    """ECE of P(first preferred): over equal-width bins of p, the share-weighted gap between
    the bin's mean p and how often the first response was in fact preferred."""
    n = len(p_first)
    if n == 0 or n != len(first_preferred):
        raise ValueError("expected_calibration_error needs one gold label per probability, and at least one")
    return sum(b["n"] * abs(b["mean_p"] - b["gold_rate"]) for b in reliability(p_first, first_preferred, bins)) / n


def refusal_reward(p_should_refuse: float, refused: bool) -> float:
    """The rule-based-reward form of harmlessness (after Mu et al. 2024, Rule Based Rewards):
    a response is rewarded for refusing exactly the requests that should be refused.
    (2s − 1)·(+1 if it refused else −1), s = P(the request should be refused): +1 for
    refusing a request the judge is sure is harmful, −1 for answering it; the signs turn over
    for a request it is sure is benign, and an undecided request (s = ½) earns nothing
    either way."""
    if not 0.0 <= p_should_refuse <= 1.0:
        raise ValueError(f"P(should refuse) must be in [0, 1], got {p_should_refuse}")
    return (2.0 * p_should_refuse - 1.0) * (1.0 if refused else -1.0)


def gated_sum(values: Sequence[Sequence[float]], weights: Sequence[float], gated: int | None,
              gate: Sequence[bool] | None) -> list[float]:
    """Σ_j w_j·v_j per sample, except where ``gate`` is set: there term ``gated`` alone,
    w_g·v_g (Llama 2's safety-gated reward, Touvron et al. 2023: on a request that should be
    refused, the safety reward decides and the helpfulness reward is left out)."""
    if len(values) != len(weights):
        raise ValueError(f"{len(values)} terms but {len(weights)} weights")
    n = len(values[0]) if values else 0
    if any(len(v) != n for v in values) or (gate is not None and len(gate) != n):
        raise ValueError("every term and the gate need one value per sample")
    out = [sum(w * v[i] for w, v in zip(weights, values)) for i in range(n)]
    if gated is None or gate is None:
        return out
    return [weights[gated] * values[gated][i] if g else t for i, (t, g) in enumerate(zip(out, gate))]


def refusal_preference(p_should_refuse: float, refused_1: bool, refused_2: bool, p_judged: float) -> float:
    """P(response 1 preferred) when harmlessness is judged on the request: where exactly one
    of the two responses refuses, the refusal is preferred with probability s = P(the request
    should be refused) (the answer with 1 − s), whatever the wording; where both or neither
    refuse, the judge's own pairwise preference ``p_judged`` stands."""
    if refused_1 == refused_2:
        return p_judged
    return p_should_refuse if refused_1 else 1.0 - p_should_refuse


def expected_score(logps: Sequence[float], values: Sequence[float]) -> float:
    """Σ v·P(v) with P the softmax over the score tokens' log-probabilities."""
    m = max(logps)
    ws = [math.exp(lp - m) for lp in logps]
    z = sum(ws)
    return sum(v * w / z for v, w in zip(values, ws))


def d_rlaif_reward(score: float, low: float = 1.0, high: float = 10.0) -> float:
    """Map an expected 1–10 score to [−1, 1]: (s − 5.5) / 4.5."""
    mid, half = (low + high) / 2, (high - low) / 2
    return (score - mid) / half


def logit(p: float, eps: float = 1e-6) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def pointwise_preference(p_yes_1: float, p_yes_2: float) -> float:
    """Bradley–Terry on two Yes/No judgements: σ(logit P_yes(y1) − logit P_yes(y2))."""
    return 1.0 / (1.0 + math.exp(-(logit(p_yes_1) - logit(p_yes_2))))


# ---------------------------------------------------------------- reward-model losses

def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Mean −log σ(r_w − r_l − m)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def soft_label_loss(r1: torch.Tensor, r2: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mean −[p·log σ(r1 − r2) + (1 − p)·log σ(r2 − r1)] with p = P(y1 > y2).

    Equals :func:`bradley_terry_loss` when p is 0 or 1.
    """
    d = r1 - r2
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()


def centering_loss(r1: torch.Tensor, r2: torch.Tensor, coef: float = 0.01) -> torch.Tensor:
    """c·mean((r1 + r2)²): keeps rewards near zero (Eisenstein et al. 2023)."""
    return coef * ((r1 + r2) ** 2).mean()


def pairwise_accuracy(r1: torch.Tensor, r2: torch.Tensor, p: torch.Tensor) -> float:
    """Share of pairs whose score order matches the label (ties in the label skipped)."""
    keep = p != 0.5
    if keep.sum() == 0:
        return float("nan")
    return float(((r1 > r2) == (p > 0.5))[keep].float().mean())


# ---------------------------------------------------------------- direct preference optimisation

def dpo_margin(pi_1: torch.Tensor, pi_2: torch.Tensor, ref_1: torch.Tensor, ref_2: torch.Tensor) -> torch.Tensor:
    """h = [log π(y1|x) − log π_ref(y1|x)] − [log π(y2|x) − log π_ref(y2|x)], each a sum over
    the response's tokens."""
    return (pi_1 - ref_1) - (pi_2 - ref_2)


def dpo_loss(h: torch.Tensor, p: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Per-pair DPO loss with soft labels p = P(y1 > y2) (Rafailov et al. 2023):
    −p·log σ(βh) − (1 − p)·log σ(−βh); with p = 1 the paper's −log σ(βh)."""
    return -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h))


def ipo_loss(h: torch.Tensor, p: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Per-pair IPO loss (Azar et al. 2023), (h − 1/(2τ))² when y1 is preferred. With a soft
    label, the p-weighted mix of both orders, p·(h − 1/(2τ))² + (1 − p)·(h + 1/(2τ))²,
    whose minimum is at h = (2p − 1)/(2τ): an unsure label asks for a smaller margin."""
    target = 1.0 / (2.0 * tau)
    return p * (h - target) ** 2 + (1 - p) * (h + target) ** 2


def implicit_reward(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO's implicit reward of a response, β·[log π(y|x) − log π_ref(y|x)]."""
    return beta * (logp - ref_logp)


def preference_loss(kind: str, h: torch.Tensor, p: torch.Tensor, beta: float = 0.1, tau: float = 0.1) -> torch.Tensor:
    if kind == "sigmoid":
        return dpo_loss(h, p, beta)
    if kind == "ipo":
        return ipo_loss(h, p, tau)
    raise ValueError(f"unknown preference loss {kind!r} (sigmoid, ipo)")
