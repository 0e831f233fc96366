"""The critic role: a per-token value model trained with the clipped value loss."""
from __future__ import annotations

import torch

from ..algos import ppo
from ..algos.lm import response_slices, sample_layout, to_frame
from ..cluster.worker import SPLIT, dispatch
from .trainable import TrainableWorker


class CriticWorker(TrainableWorker):
    """``AutoModelForTokenClassification`` with one label: V(s_t) at every position, an HF
    model on its own. The value of response token j is read where its logprob is: at the
    position that predicts it."""

    lora_task = "TOKEN_CLS"

    def auto_class(self):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def load_kwargs(self):
        return {"num_labels": 1}

    def _values(self, samples: list[dict]):
        t, act = sample_layout(samples, self.tok.pad_token_id, self.packing)
        v = self.per_token(t)[..., 0]
        return v[:, :-1].float(), t, act.to(v.device)

    @dispatch(SPLIT, out="values")
    def values(self, samples: list[dict], batch_size: int = 8) -> list[list[float]]:
        out: list[list[float]] = []
        self.engine.eval()
        with torch.no_grad():
            for chunk, idle in self.lockstep_batches(samples, batch_size):
                v, t, _ = self._values(chunk)
                if not idle:
                    out += response_slices(v.cpu(), t, chunk)
        self.engine.train()
        return out

    @dispatch(SPLIT)
    def value_update(self, samples: list[dict], global_tokens: int, clip: float = 0.2) -> dict[str, list]:
        def loss_of(chunk):
            v, t, act = self._values(chunk)
            old = to_frame([s["old_values"] for s in chunk], t, chunk).to(v.device)
            ret = to_frame([s["returns"] for s in chunk], t, chunk).to(v.device)
            loss, st = ppo.value_loss(v, old, ret, act, clip)
            n = act.sum()
            return loss * n, {"value_loss": float(loss.detach()) * float(n),
                              "vf_clipfrac": float(st["vf_clipfrac"]) * float(n), "tokens": int(n)}

        # Token-classification heads carry dropout (0.1 by default); PPO wants it off.
        self.engine.eval()
        try:
            return self.accumulate(samples, global_tokens, loss_of)
        finally:
            self.engine.train()
