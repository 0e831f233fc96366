"""The rollout role: an inference engine (vLLM or HF) per rank, fed the policy's weights.

Ranks are independent data-parallel replicas (an engine's own tensor parallelism lives
inside vLLM), so this role joins no torch process group. Weights arrive in buckets of
whole layers from the trainer's rank 0 (:meth:`TrainableWorker.sync_weights`): between
``begin_sync`` and ``end_sync`` the engine refuses rollouts, and ``end_sync`` commits
the new weight version only when the content hash of everything received equals the
trainer's.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from ..cluster.worker import EACH, SPLIT, Worker, dispatch


class RolloutWorker(Worker):
    engine = None

    def init_distributed(self, master_addr: str, master_port: int, timeout_s: float = 300) -> bool:
        return True  # replicas, not ranks of one model: nothing to join

    @dispatch(EACH)
    def init_engine(self, model: dict, engine: str, settings: dict, version: int = 0) -> dict[str, Any]:
        from ..config import ModelConfig
        from ..models import resolve
        from ..rollout import ENGINES

        t0 = time.time()
        from ..models import choose_dtype

        mc = ModelConfig.model_validate(model)
        # The engine samples for the trainer: it runs in the trainer's dtype.
        mc.dtype, _ = choose_dtype(mc.dtype, trains=True, device=self.device.type)
        model_dir = resolve(mc.name, mc.seed, mc.overrides, say=lambda s: None)
        self.engine = ENGINES[engine](str(model_dir), mc.dtype, **settings)
        self.tok = self.engine.tok
        self.version = version
        self._incoming: dict[str, str] | None = None
        return {"engine": engine, "init_s": time.time() - t0, "rank": self.rank}

    # ------------------------------------------------------------ sampling

    @dispatch(SPLIT, out="rows", takes="prompt")
    def rollout(self, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.7, top_p: float = 1.0,
                seed: int = 0, batch_size: int = 16, min_new_tokens: int = 0, version: int | None = None,
                first_index: int = 0) -> list[dict]:
        """One sample per prompt, each with the engine's log-probs and the weight version
        it was drawn with. ``version``: the trainer's; any other is an error (None: no check,
        for sampling a model that is not being trained)."""
        from ..data import chat_prompt
        from ..rollout import WeightVersionError, finish_sample

        if version is not None and version != self.version:
            held = ("partly loaded weights (a sync began and did not end)" if self.version is None
                    else f"weights of version {self.version}")
            raise WeightVersionError(f"rollout engine {self.rank} holds {held}, the trainer is at {version}: a "
                                     "weight sync was skipped or failed")
        ids = [self.tok(chat_prompt(self.tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
        seeds = [seed * 1_000_003 + self.rank * 100_003 + i for i in range(len(prompts))]
        res = self.engine.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seeds=seeds, min_new_tokens=min_new_tokens, batch_size=batch_size)
        out = []
        for p_ids, (resp, lps) in zip(ids, res):
            s = finish_sample(p_ids, resp, lps, self.tok.eos_token_id, self.tok.pad_token_id, self.tok)
            s["weight_version"] = self.version
            out.append(s)
        return out

    @dispatch(SPLIT)
    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0, batch_size: int = 16, ended: bool = False) -> list:
        """Texts only (evaluation, label pairs, upstream answers): greedy when temperature
        is 0. The signature of the other roles' ``generate``. ``ended``: each as
        ``{"response", "ended"}``, ended saying whether it stopped before max_new_tokens."""
        out = self.rollout(prompts, max_new_tokens, temperature, 1.0, seed, batch_size)
        return [{"response": s["response"], "ended": s["ended"]} if ended else s["response"] for s in out]

    # ------------------------------------------------------------ weight sync

    @dispatch(EACH)
    def begin_sync(self, version: int) -> int:
        # From the first bucket on, the engine holds neither the old weights nor the new.
        self._incoming, self._pending, self.version = {}, version, None
        return self.rank

    @dispatch(EACH)
    def load_bucket(self, named: list[tuple[str, torch.Tensor]]) -> int:
        from ..rollout import SyncError, tensor_digest

        if self._incoming is None:
            raise SyncError(f"rollout engine {self.rank}: a bucket arrived outside a sync (begin_sync first)")
        self.engine.load(named)
        for n, t in named:
            self._incoming[n] = tensor_digest(n, t)
        return len(named)

    @dispatch(EACH)
    def end_sync(self, version: int, digest: str, n_params: int) -> dict[str, Any]:
        from ..rollout import SyncError, combine_digests

        got = self._incoming or {}
        self._incoming = None
        mine = combine_digests(got)
        if version != self._pending or len(got) != n_params or mine != digest:
            raise SyncError(f"rollout engine {self.rank}: the sync to version {version} delivered {len(got)} of "
                            f"{n_params} parameters, content hash {mine} against the trainer's {digest}; no "
                            "rollout uses these weights until a complete sync")
        self.version = version
        return {"rank": self.rank, "version": version, "digest": mine}

    @dispatch(EACH)
    def weights_version(self) -> int:
        return self.version

    @dispatch(EACH)
    def state_digest(self) -> str | None:
        """The content hash of the engine's own parameters, where its layout is the
        trainer's (HF engine); None for vLLM (fused layout)."""
        from ..rollout import combine_digests

        d = self.engine.state_digests()
        return combine_digests(d) if d else None

    def shutdown(self) -> bool:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        return True
