"""SteerLM's attribute strings (Dong et al. 2023), as pure functions: the string
a conditioned prompt carries, its parsing, and the rule that measures verbosity.

An attribute string names each attribute with an integer level 0–4, in a fixed order:
``helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:1``. Training puts each
example's annotated levels in its prompt; at inference the user sets them to steer.
"""
from __future__ import annotations

from .errors import RayalignError

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
LEVELS = range(0, 5)


class SteerError(RayalignError, ValueError):
    """A malformed attribute string or value."""


def level(value: float) -> int:
    """A predicted or rated value as a level: rounded and clipped to 0–4."""
    return int(min(4, max(0, round(float(value)))))


def format_attributes(values: dict[str, float], names: tuple[str, ...] | list[str] = ATTRIBUTES) -> str:
    missing = [n for n in names if n not in values]
    if missing:
        raise SteerError(f"attribute string: no value for {', '.join(missing)}")
    return ",".join(f"{n}:{level(values[n])}" for n in names)


def parse_attributes(text: str, names: tuple[str, ...] | list[str] = ATTRIBUTES,
                     defaults: dict[str, int] | None = None) -> dict[str, int]:
    """``"verbosity:4,helpfulness:2"`` → levels, the rest from ``defaults``; every name
    must end up with a level 0–4."""
    out = dict(defaults or {})
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = part.partition(":")
        name = name.strip()
        if not sep or name not in names:
            raise SteerError(f"attribute string: {part!r} is not NAME:LEVEL with NAME one of {', '.join(names)}")
        try:
            v = int(val)
        except ValueError:
            raise SteerError(f"attribute string: {name}'s level {val.strip()!r} is not an integer 0-4") from None
        if v not in LEVELS:
            raise SteerError(f"attribute string: {name}'s level {v} is outside 0-4")
        out[name] = v
    missing = [n for n in names if n not in out]
    if missing:
        raise SteerError(f"attribute string: no level for {', '.join(missing)}")
    return {n: out[n] for n in names}


# Each level of the five attributes as a plain instruction. A 135M policy did not learn what
# the digits of "verbosity:4" mean from 1-3 epochs of conditioned SFT, while it already
# follows plain length instructions (measured on SmolLM2-135M-Instruct, 16 prompts, greedy:
# "Answer in a few words." 13 words, "Answer in detail." 46; "verbosity:0" 32, "verbosity:4" 32).
PHRASES: dict[str, tuple[str, ...]] = {
    "helpfulness": ("Do not try to help.", "Help a little.", "Be somewhat helpful.", "Be helpful.",
                    "Be as helpful as possible."),
    "correctness": ("Accuracy does not matter.", "Be roughly accurate.", "Be mostly accurate.", "Be accurate.",
                    "Be fully accurate."),
    "coherence": ("Coherence does not matter.", "Be loosely coherent.", "Be fairly coherent.", "Be coherent.",
                  "Be perfectly clear and coherent."),
    "complexity": ("Use very simple words.", "Use simple words.", "Use everyday language.",
                   "Use advanced language.", "Use expert language."),
    "verbosity": ("Answer in a few words.", "Answer in one short sentence.", "Answer in a sentence or two.",
                  "Answer in a few sentences.", "Answer in detail."),
}
LEVEL_WORDS = ("very low", "low", "medium", "high", "very high")
RENDERINGS = ("codes", "words")


def render_attributes(values: dict[str, float], names: tuple[str, ...] | list[str] = ATTRIBUTES,
                      style: str = "codes") -> str:
    """The attribute string: ``codes`` = ``helpfulness:4,...,verbosity:1`` (the paper's
    form), ``words`` = each level as a plain instruction (:data:`PHRASES`; an attribute
    without phrases as ``Name: high.``)."""
    if style == "codes":
        return format_attributes(values, names)
    if style != "words":
        raise SteerError(f"attribute rendering {style!r}: expected one of {', '.join(RENDERINGS)}")
    format_attributes(values, names)  # the same checks
    return " ".join(PHRASES[n][level(values[n])] if n in PHRASES else f"{n.capitalize()}: "
                    f"{LEVEL_WORDS[level(values[n])]}." for n in names)


def steer_prompt(prompt: str, values: dict[str, float], names: tuple[str, ...] | list[str] = ATTRIBUTES,
                 style: str = "codes") -> str:
    """The user turn of a conditioned example: the prompt, then its attribute string on a
    line of its own (just before the answer it conditions)."""
    return f"{prompt}\n\n<attributes>{render_attributes(values, names, style)}</attributes>"


def instructed_levels(instructed: dict[str, list[int]], prompt_index: int, sample: int) -> dict[str, int]:
    """The levels a sampling prompt asks for: sample ``k`` of prompt ``i`` takes each
    attribute's ``levels[(i + k) % len(levels)]``, so a prompt's samples cycle through the
    levels (with as many samples as levels, each prompt gets every one) and one sample per
    prompt alternates them across prompts."""
    for a, levels in instructed.items():
        if not levels or any(v not in LEVELS for v in levels):
            raise SteerError(f"instructed levels of {a} must be a non-empty list of levels 0-4, not {levels}")
    return {a: levels[(prompt_index + sample) % len(levels)] for a, levels in instructed.items()}


def controlled(values: list[float], control: list[int]) -> tuple[list[float], dict[int, float]]:
    """``values`` with what ``control`` explains taken out: each value less the mean of the
    values at its control level, plus the overall mean (so the scale stays where it was).
    Returns them and the mean at each control level."""
    if len(values) != len(control) or not values:
        raise SteerError(f"controlled: {len(values)} values for {len(control)} control levels")
    at: dict[int, list[float]] = {}
    for v, c in zip(values, control):
        at.setdefault(int(c), []).append(float(v))
    means = {c: sum(xs) / len(xs) for c, xs in sorted(at.items())}
    overall = sum(values) / len(values)
    return [float(v) - means[int(c)] + overall for v, c in zip(values, control)], means


def quantile_levels(values: list[float], cuts: list[float] | None = None) -> tuple[list[int], list[float]]:
    """Each value placed among the quintile cut points of ``values`` (or of ``cuts``): level
    0 (lowest fifth) to 4. Returns the levels and the cut points (to place other values on
    the same scale)."""
    if cuts is None:
        s = sorted(values)
        if not s:
            raise SteerError("quantile_levels needs values")
        cuts = [s[min(len(s) - 1, int(len(s) * q / 5))] for q in range(1, 5)]
    return [sum(v > k for k in cuts) for v in values], list(cuts)


def word_levels(responses: list[str], cuts: list[float] | None = None) -> tuple[list[int], list[float]]:
    """Verbosity measured: a response's word count among the quintiles of the responses'
    counts (:func:`quantile_levels`), 0 (shortest fifth) to 4."""
    return quantile_levels([len(r.split()) for r in responses], cuts)
