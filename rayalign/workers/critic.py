"""The critic role: a per-token value model trained with the clipped value loss."""
from __future__ import annotations

import torch

from ..algos import ppo
from ..algos.lm import pack_samples, response_slices, to_frame
from ..cluster.worker import SPLIT, dispatch
from .trainable import TrainableWorker


class CriticWorker(TrainableWorker):
    """``AutoModelForTokenClassification`` with one label: V(s_t) at every position, an HF
    model on its own. The value of response token j is read where its logprob is: at the
    position that predicts it."""

    def auto_class(self):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def load_kwargs(self):
        return {"num_labels": 1}

    def _values(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, attn, act = pack_samples(samples, self.tok.pad_token_id)
        v = self.engine(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits[..., 0]
        return v[:, :-1].float(), act.to(v.device)

    @dispatch(SPLIT)
    def values(self, samples: list[dict], batch_size: int = 8) -> list[list[float]]:
        out: list[list[float]] = []
        self.engine.eval()
        with torch.no_grad():
            for b in range(self.batches_for_all_ranks(len(samples), batch_size)):
                chunk = samples[b * batch_size:(b + 1) * batch_size]
                v, _ = self._values(chunk or samples[:1])
                if chunk:
                    out += response_slices(v.cpu(), chunk)
        self.engine.train()
        return out

    @dispatch(SPLIT)
    def value_update(self, samples: list[dict], global_tokens: int, clip: float = 0.2) -> dict[str, list]:
        def loss_of(chunk):
            v, act = self._values(chunk)
            w = v.shape[1]
            old = to_frame([s["old_values"] for s in chunk], chunk, w).to(v.device)
            ret = to_frame([s["returns"] for s in chunk], chunk, w).to(v.device)
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
