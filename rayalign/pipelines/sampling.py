"""Where a pipeline's samples come from: the policy's own workers, or the rollout role's
engines kept at the policy's weights (synced before a rollout whenever the policy has
moved on)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from ..config import Config, ModelConfig
from ..rollout import WeightVersionError, resolve_engine
from .common import role_group, say


class Sampler:
    """``rollout`` and ``generate`` with the policy group's signatures. ``version`` is the
    policy's weight version (PPO: iterations done); every rollout is checked against it."""

    def __init__(self, policy, engines=None, rc=None, kind: str = "trainer"):
        self.policy, self.engines, self.rc, self.kind = policy, engines, rc, kind
        self.version = 0
        self._engine_version: int | None = None
        self.last_sync: dict = {}

    @property
    def world_size(self) -> int:
        return (self.engines or self.policy).world_size

    def ensure_synced(self) -> None:
        if self.engines is None or self._engine_version == self.version:
            return
        targets = getattr(self.engines, "actors", None) or [self.engines.worker]
        self.last_sync = self.policy.sync_weights(targets, self.version, self.rc.sync_bucket_mb, self.rc.sync_timeout_s)
        self._engine_version = self.version

    def rollout(self, prompts, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                batch_size: int, min_new_tokens: int = 0):
        """Samples for ``prompts`` (a list, or :class:`~rayalign.batch.Rows` of prompts: then
        Rows of samples)."""
        if self.engines is None:
            return self.policy.rollout(prompts, max_new_tokens, temperature, top_p, seed, batch_size, min_new_tokens)
        self.ensure_synced()
        samples = self.engines.rollout(prompts, max_new_tokens, temperature, top_p, seed, batch_size,
                                       min_new_tokens, self.version)
        if not isinstance(samples, list):
            return samples  # rows in the object store: the advantage task checks their versions
        stale = {s["weight_version"] for s in samples} - {self.version}
        if stale:
            raise WeightVersionError(f"rollouts sampled with weight version(s) {sorted(stale)}, the policy is at "
                                     f"{self.version}")
        return samples

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        if self.engines is None:
            return self.policy.generate(prompts, max_new_tokens, temperature)
        self.ensure_synced()
        return self.engines.generate(prompts, max_new_tokens, temperature)

    def map(self, method: str, items: list, *args, **kwargs) -> list:
        """``generate`` over any number of prompts, padded to the sampling role's world size
        (:meth:`rayalign.cluster.group.ActorGroup.map`)."""
        if method != "generate":
            raise ValueError(f"Sampler.map serves generate, not {method}")
        if self.engines is not None:
            self.ensure_synced()
        return (self.engines or self.policy).map(method, items, *args, **kwargs)


def engine_settings(cfg: Config) -> dict:
    rc = cfg.rollout
    return {"seed": 0, "max_model_len": rc.max_model_len, "tensor_parallel_size": rc.tensor_parallel_size,
            "gpu_memory_utilization": rc.gpu_memory_utilization, "kv_cache_gb": rc.kv_cache_gb,
            "enforce_eager": rc.enforce_eager}


@contextlib.contextmanager
def open_sampler(cfg: Config, policy, model: ModelConfig, version: int = 0) -> Iterator[Sampler]:
    """The sampler for ``policy`` as ``cfg.rollout`` says; engines start from ``model`` and
    are synced to the policy's weights before their first rollout."""
    from ..workers.rollout import RolloutWorker

    from ..models import resolve

    rc = cfg.rollout
    kind, why = resolve_engine(rc.engine, str(resolve(model.name, model.seed, model.overrides, say=lambda s: None)))
    if why:
        say(f"rollout: sampling inside the policy's workers ({why})")
    if kind == "trainer":
        s = Sampler(policy)
        s.version = version
        yield s
        return
    with role_group("rollout", RolloutWorker, rc.group) as engines:
        info = engines.init_engine(model.model_dump(), kind, engine_settings(cfg), -1)
        say(f"rollout: {len(info)} {kind} engine(s) ready in {max(i['init_s'] for i in info):.0f}s")
        s = Sampler(policy, engines, rc, kind)
        s.version = version
        yield s


@contextlib.contextmanager
def sampling_group(cfg: Config, role: str, model: ModelConfig, group) -> Iterator:
    """A group that writes answers with ``model`` (label pairs, upstream answers, Aligner
    corrections to build from): vLLM engines where ``rollout.engine`` resolves to vllm,
    else transformers.generate on a FrozenLMWorker group. Both answer
    ``generate(prompts, max_new_tokens, temperature, seed, batch_size)``."""
    from ..models import resolve
    from ..workers.rollout import RolloutWorker
    from .label import lm_group

    kind, _ = resolve_engine(cfg.rollout.engine, str(resolve(model.name, model.seed, model.overrides,
                                                            say=lambda s: None)))
    if kind != "vllm":
        with lm_group(role, model, group) as grp:
            yield grp
        return
    with role_group(role, RolloutWorker, group) as grp:
        info = grp.init_engine(model.model_dump(), "vllm", engine_settings(cfg), 0)
        say(f"{role} ready: {model.name} on {len(info)} vLLM engine(s)")
        yield grp
