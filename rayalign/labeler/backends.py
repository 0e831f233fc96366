"""Labeler backends behind one interface.

A backend answers two questions about labeling prompts (plain text, a user turn):

* ``option_logprobs(items)`` — for each ``(prompt, options)``, the log-probability of
  each option as the first token of the answer;
* ``generate(prompts, ...)`` — free text (rationales).

Backends: a local Hugging Face model hosted by a labeler actor group (or in process),
an OpenAI-compatible HTTP endpoint (completions with logprobs), and a plain Python
function.
"""
from __future__ import annotations


import importlib
import json
import math
import os
from typing import Any, Callable, Protocol

from ..errors import RayalignError
from ..httpjson import post_json


class LabelerError(RayalignError, RuntimeError):
    pass


class Backend(Protocol):
    name: str

    def option_logprobs(self, items: list[tuple[str, list[str]]]) -> list[list[float]]: ...

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0) -> list[str]: ...

    def continuation_logprobs(self, items: list[tuple[str, str]]) -> list[tuple[float, int]]: ...


class GroupBackend:
    """A labeler actor group (``ActorGroup`` or ``LocalGroup`` of ``FrozenLMWorker``)."""

    def __init__(self, group, batch_size: int = 8):
        self.group, self.batch_size, self.name = group, batch_size, f"hf:{group.name}"

    def option_logprobs(self, items):
        if not items:
            return []
        return self.group.option_logprobs(_pad_to(items, self.group.world_size), self.batch_size)[:len(items)]

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, seed=0):
        if not prompts:
            return []
        return self.group.generate(_pad_to(prompts, self.group.world_size), max_new_tokens, temperature,
                                   seed, self.batch_size)[:len(prompts)]

    def question_logprobs(self, texts, questions, options):
        if not texts:
            return []
        return self.group.question_logprobs(_pad_to(texts, self.group.world_size), questions, options,
                                            self.batch_size)[:len(texts)]

    def continuation_logprobs(self, items):
        if not items:
            return []
        return self.group.continuation_logprobs(_pad_to(items, self.group.world_size),
                                                self.batch_size)[:len(items)]


def _pad_to(items: list, n: int) -> list:
    """A split call needs at least one item per rank; repeat the last one (results dropped)."""
    return list(items) + [items[-1]] * max(0, n - len(items))


class FunctionBackend:
    """``fn(prompt, options) -> list of log-probs`` (and optionally ``gen(prompt) -> str``).

    For rule-based labelers and tests. ``fn`` may also be given as ``"module:function"``.
    """

    def __init__(self, fn: Callable | str, gen: Callable | str | None = None,
                 cont: Callable | str | None = None):
        self.fn = _import(fn) if isinstance(fn, str) else fn
        self.gen = _import(gen) if isinstance(gen, str) else gen
        self.cont = _import(cont) if isinstance(cont, str) else cont
        self.name = f"function:{getattr(self.fn, '__name__', 'fn')}"

    def option_logprobs(self, items):
        out = []
        for prompt, options in items:
            lps = list(self.fn(prompt, options))
            if len(lps) != len(options):
                raise LabelerError(f"{self.name} returned {len(lps)} scores for {len(options)} options")
            out.append([float(x) for x in lps])
        return out

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, seed=0):
        if self.gen is None:
            raise LabelerError(f"{self.name} has no generate function; chain-of-thought needs one")
        return [str(self.gen(p)) for p in prompts]

    def continuation_logprobs(self, items):
        if self.cont is None:
            raise LabelerError(f"{self.name} has no continuation function; pointwise relevance needs one "
                               "(or set labeler.pointwise_relevance: 0)")
        return [(float(a), int(b)) for a, b in (self.cont(p, c) for p, c in items)]


def _import(path: str) -> Callable:
    if ":" not in path:
        raise LabelerError(f"function backend {path!r} must be 'module:function'")
    mod, attr = path.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise LabelerError(f"cannot import {path!r}: {exc}") from None


class HTTPBackend:
    """An OpenAI-compatible ``/v1/completions`` endpoint (vLLM, TGI, hosted judges).

    Option scores come from ``logprobs`` (top-k alternatives of the first generated
    token); an option missing from the top-k gets ``missing_logprob``. Requests time out
    and are retried with back-off; the API key is read from an environment variable.
    """

    def __init__(self, url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout_s: float = 30.0, retries: int = 3, top_logprobs: int = 20,
                 missing_logprob: float = -30.0, backoff_s: float = 0.5, chat_prefix: str = "",
                 chat_suffix: str = ""):
        self.url = url.rstrip("/")
        if not self.url.endswith("/completions"):
            self.url += "/v1/completions" if not self.url.endswith("/v1") else "/completions"
        self.model, self.timeout_s, self.retries = model, timeout_s, retries
        self.top_logprobs, self.missing_logprob, self.backoff_s = top_logprobs, missing_logprob, backoff_s
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.chat_prefix, self.chat_suffix = chat_prefix, chat_suffix
        self.name = f"http:{self.url}"

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        return post_json(self.url, body, LabelerError, self.api_key, self.timeout_s, self.retries, self.backoff_s)

    def _wrap(self, prompt: str) -> str:
        return f"{self.chat_prefix}{prompt}{self.chat_suffix}"

    def option_logprobs(self, items):
        out = []
        for prompt, options in items:
            body = {"model": self.model, "prompt": self._wrap(prompt), "max_tokens": 1,
                    "temperature": 0.0, "logprobs": self.top_logprobs}
            resp = self._post(body)
            try:
                top = resp["choices"][0]["logprobs"]["top_logprobs"][0]
                if not isinstance(top, dict):
                    raise TypeError
            except (KeyError, IndexError, TypeError):
                raise LabelerError(f"{self.url}: malformed completion (no choices[0].logprobs.top_logprobs[0]):"
                                   f" {json.dumps(resp)[:200]}") from None
            row = []
            for opt in options:
                vals = [float(v) for k, v in top.items() if k.strip() == opt]
                row.append(math.log(sum(math.exp(v) for v in vals)) if vals else self.missing_logprob)
            out.append(row)
        return out

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, seed=0):
        out = []
        for i, p in enumerate(prompts):
            resp = self._post({"model": self.model, "prompt": self._wrap(p), "max_tokens": max_new_tokens,
                               "temperature": temperature, "seed": seed + i})
            try:
                out.append(str(resp["choices"][0]["text"]))
            except (KeyError, IndexError, TypeError):
                raise LabelerError(f"{self.url}: malformed completion (no choices[0].text)") from None
        return out

    def continuation_logprobs(self, items):
        raise LabelerError(f"{self.name}: pointwise relevance needs prompt log-probabilities, which this "
                           "backend does not request; set labeler.pointwise_relevance: 0")
