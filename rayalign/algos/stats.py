"""Confidence intervals for the rates rayalign reports, as pure functions.

* :func:`wilson_interval` — a binomial proportion (agreement with gold labels, refusal
  rate, win rate), Wilson 1927: good coverage at small n and near 0 or 1, unlike the
  normal approximation.
* :func:`paired_difference` — the difference of two proportions measured on the same items
  (a policy before and after training on the same prompts; two labelers on the same pairs),
  from the discordant counts (McNemar's table), with the Agresti–Min (2005) adjusted Wald
  interval.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes of n (k may be fractional: ties count ½)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: k={k} outside [0, {n}]")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: float, n: int) -> dict:
    """A proportion with its 95% Wilson interval, ready for a report."""
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n, "n": n, "ci95": [lo, hi]}


def paired_difference(only_b: int, only_a: int, n: int, z: float = Z95) -> dict:
    """rate(B) − rate(A) on the same n items, where ``only_b`` items succeed under B alone and
    ``only_a`` under A alone. Agresti–Min interval: ½ added to each cell of the 2×2 table."""
    if n <= 0 or only_a < 0 or only_b < 0 or only_a + only_b > n:
        raise ValueError(f"paired_difference: impossible counts b={only_b}, a={only_a}, n={n}")
    diff = (only_b - only_a) / n
    b, c, m = only_b + 0.5, only_a + 0.5, n + 2.0
    d = (b - c) / m
    se = math.sqrt((b + c) - (b - c) ** 2 / m) / m
    return {"difference": diff, "n": n, "only_b": only_b, "only_a": only_a,
            "ci95": [max(-1.0, d - z * se), min(1.0, d + z * se)]}


def mean_interval(xs: list[float], z: float = Z95) -> dict:
    """A mean with its normal-approximation 95% interval (mean ± z·s/√n; s the sample
    standard deviation)."""
    n = len(xs)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    half = z * s / math.sqrt(n)
    return {"mean": m, "n": n, "ci95": [m - half, m + half]}


def ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on tie-averaged ranks); 0 when either side is
    constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman needs two equally long lists of at least 2 values")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else 0.0


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a positive's score > a negative's), ties counting one half (the Mann-Whitney AUC, by ranks)."""
    allv = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    rank_sum, i = 0.0, 0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        r = (i + j + 1) / 2
        rank_sum += r * sum(lab for _, lab in allv[i:j])
        i = j
    n1, n0 = len(pos), len(neg)
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)
