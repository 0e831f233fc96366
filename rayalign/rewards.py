"""Reward sources for PPO behind one call: ``scores(prompts, responses) -> floats``.

A trained reward model on its own actor group, the AI labeler scoring each response
directly (d-RLAIF), a Python function, or an HTTP endpoint; several are summed with
their weights. Each source's raw mean is reported separately so a run shows which term
moved.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import Config, ConfigError, ModelConfig, RewardSourceConfig
from .errors import RayalignError
from .httpjson import post_json


class RewardError(RayalignError, RuntimeError):
    """A reward source failed or answered something that is not one number per response."""


def _checked(name: str, values: Any, n: int) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"reward source {name}: expected {n} scores, got {got}")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward source {name}: score {i} is {v!r}, not a number") from None
        if not math.isfinite(f):
            raise RewardError(f"reward source {name}: score {i} is {f}")
        out.append(f)
    return out


class HTTPReward:
    """POST ``{"prompts": [...], "responses": [...]}`` to ``url``; the answer is
    ``{"rewards": [...]}``, one number per response. Timeouts and 5xx are retried with
    back-off; an API key comes from an environment variable as a bearer token."""

    def __init__(self, url: str, api_key_env: str | None = None, timeout_s: float = 30.0, retries: int = 3,
                 batch_size: int = 64):
        self.url, self.timeout_s, self.retries, self.batch_size = url, timeout_s, retries, batch_size
        self.key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.key:
            raise ConfigError(f"http reward: environment variable {api_key_env} is not set")

    def _post(self, body: dict) -> dict:
        return post_json(self.url, body, RewardError, self.key, self.timeout_s, self.retries)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            p, r = prompts[i:i + self.batch_size], responses[i:i + self.batch_size]
            ans = self._post({"prompts": p, "responses": r})
            if not isinstance(ans, dict) or "rewards" not in ans:
                raise RewardError(f"http reward {self.url}: the answer has no 'rewards' list")
            out += _checked(self.url, ans["rewards"], len(p))
        return out


def import_callable(spec: str) -> Callable:
    from .labeler.backends import _import

    try:
        return _import(spec)
    except Exception as exc:
        raise ConfigError(f"cannot import reward function {spec!r}: {exc}") from None


class RewardMix:
    """Σ weight_i · source_i(prompts, responses); ``last_terms`` keeps each term's mean."""

    def __init__(self, terms: list[tuple[str, float, Callable[[list[str], list[str]], list[float]]]],
                 groups: list | None = None):
        if not terms:
            raise ConfigError("ppo.rewards: at least one reward source is needed")
        self.terms = terms
        if sum(getattr(fn, "gate", None) is not None for _, _, fn in terms) > 1:
            raise ConfigError("ppo.rewards: at most one term may gate the others (gate: true)")
        self.groups = list(groups or [])  # actor groups behind the terms (RM, labeler)
        self.last_terms: dict[str, float] = {}

    def __call__(self, prompts: list[str], samples: list) -> list[float]:
        """Scores for responses given as texts or as rollout samples (dicts with "response");
        a term with a ``gate`` (the refusal term's ``gate: true``) is the whole reward where
        its gate is set (``algos.preference.gated_sum``)."""
        from .algos.preference import gated_sum

        responses = [s["response"] if isinstance(s, dict) else s for s in samples]
        self.last_terms = {}
        values, gated, gate = [], None, None
        for j, (name, weight, fn) in enumerate(self.terms):
            vals = _checked(name, fn(prompts, responses), len(prompts))
            self.last_terms[f"reward_{name}"] = sum(vals) / max(1, len(vals))
            values.append(vals)
            if getattr(fn, "gate", None) is not None:
                gated, gate = j, [bool(g) for g in fn.gate(prompts)]
                self.last_terms["gated_share"] = sum(gate) / max(1, len(gate))
        return gated_sum(values, [w for _, w, _ in self.terms], gated, gate)


def _rm_scorer(group, normalize: bool) -> Callable[[list[str], list[str]], list[float]]:
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        return group.map("score_texts", list(zip(prompts, responses)), normalize)

    score.group = group
    return score


def rm_path(src: RewardSourceConfig, i: int, default_rm: Path | None) -> Path:
    path = Path(src.path) if src.path else default_rm
    if path is None or not (path / "config.json").is_file():
        raise ConfigError(f"ppo.rewards[{i}]: type rm needs path: an exported reward model directory "
                          f"(got {str(path) if path else 'none'}); `rayalign rm` writes one to RUN/final/rm")
    return path


def preflight(cfg: Config, default_rm: Path | None = None) -> None:
    """Every reward source checked before any model loads: paths exist, functions import,
    API keys are set."""
    for i, src in enumerate(cfg.ppo.rewards):
        if src.type == "rm":
            rm_path(src, i, default_rm)
        elif src.type == "function":
            import_callable(src.function)
        elif src.type == "http" and src.api_key_env and not os.environ.get(src.api_key_env):
            raise ConfigError(f"ppo.rewards[{i}]: environment variable {src.api_key_env} is not set")


@contextlib.contextmanager
def open_rewards(cfg: Config, default_rm: Path | None = None, labeler=None) -> Iterator[RewardMix]:
    """Start every configured source (reward groups included) for the block's duration.
    ``labeler`` is an already opened :class:`Labeler` for ``labeler`` terms."""
    from .pipelines.common import role_group
    from .workers.reward import RewardWorker

    terms, groups = [], []
    with contextlib.ExitStack() as stack:
        names: dict[str, int] = {}
        for i, src in enumerate(cfg.ppo.rewards):
            names[src.type] = names.get(src.type, 0) + 1
            name = src.type if names[src.type] == 1 else f"{src.type}{names[src.type]}"
            fn = _open_source(src, i, stack, default_rm, labeler, role_group, RewardWorker)
            terms.append((name, src.weight, fn))
            if getattr(fn, "group", None) is not None:
                groups.append(fn.group)
        if labeler is not None and any(s.type in ("labeler", "refusal") for s in cfg.ppo.rewards):
            grp = getattr(labeler.backend, "group", None)
            if grp is not None:
                groups.append(grp)
        yield RewardMix(terms, groups)


def _open_source(src: RewardSourceConfig, i: int, stack: contextlib.ExitStack, default_rm: Path | None,
                 labeler, role_group, RewardWorker) -> Callable[[list[str], list[str]], list[float]]:
    if src.type == "function":
        fn = import_callable(src.function)
        return lambda p, r: fn(p, r)
    if src.type == "http":
        return HTTPReward(src.url, src.api_key_env, src.timeout_s, src.retries, src.batch_size)
    if src.type in ("labeler", "refusal"):
        if labeler is None:
            raise ConfigError(f"ppo.rewards: a {src.type} term needs the labeler (internal: none was opened)")
        if src.type == "refusal":
            def refusal(p, r):
                return labeler.refusal_rewards(list(zip(p, r)))
            if src.gate:
                # The same cached P(should refuse) the term itself reads: no extra forward.
                refusal.gate = lambda p: [s > 0.5 for s in labeler.should_refuse(list(p))]
            return refusal
        return lambda p, r: labeler.rewards(list(zip(p, r)))
    path = rm_path(src, i, default_rm)
    grp = stack.enter_context(role_group(f"reward{i}" if i else "reward", RewardWorker, src.group))
    from .config import TrainConfig

    grp.init_model(ModelConfig(name=str(path)).model_dump(), src.group.zero.model_dump(),
                   TrainConfig(batch_size=src.group.workers, micro_batch_size=1).model_dump(), 1)
    return _rm_scorer(grp, src.normalize)
