"""The reward role: a scalar-head model trained on preferences, then serving scores.

The model is ``AutoModelForSequenceClassification`` with one label, so the saved
directory is a plain Hugging Face reward model: a causal LM scores at its last non-pad
token, an encoder (BERT, MiniLM) at its first token. Score statistics for reward
normalisation are saved beside it (``reward_stats.json``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..algos.preference import bradley_terry_loss, centering_loss, soft_label_loss
from ..cluster.worker import ALL, SPLIT, dispatch
from ..config import RMLossConfig
from ..algos.lm import layout
from .trainable import TrainableWorker

STATS_FILE = "reward_stats.json"


class RewardWorker(TrainableWorker):
    loss_cfg: RMLossConfig = RMLossConfig()
    stats: dict[str, float] | None = None

    lora_task = "SEQ_CLS"

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def load_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 1}

    def prepare_module(self, module):
        # Last-token pooling finds the response's end through the pad id.
        module.config.pad_token_id = self.tok.pad_token_id
        return module

    @dispatch(ALL)
    def set_loss(self, loss: dict) -> bool:
        self.loss_cfg = RMLossConfig.model_validate(loss)
        return True

    def per_token(self, tokens) -> torch.Tensor:
        """The score head's output at every position [R, W, 1], read before the model pools
        it (a sequence-classification head pools at the last token of each *row*, which
        in a packed row is only the last sequence's)."""
        head = getattr(self.engine.module, "score", None)
        if head is None:
            raise TypeError(f"{type(self.engine.module).__name__} has no per-token score head")
        seen: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda mod, args, out: seen.append(out))
        try:
            self.engine(**tokens.inputs(self.device))
        finally:
            hook.remove()
        return seen[-1]

    def _outputs(self, seqs: list[list[int]]) -> torch.Tensor:
        """The head's outputs for each sequence, [N, num_labels]."""
        pad = self.tok.pad_token_id
        t = layout(seqs, pad, self.packing)
        if not t.packed:
            return self.engine(**t.inputs(self.device)).logits.float()
        # Pooled where transformers pools a padded row: the last token that is not the pad id.
        last = [max((i for i, x in enumerate(s) if x != pad), default=len(s) - 1) for s in seqs]
        v = self.per_token(t).float()
        return v[torch.tensor(t.rows, device=v.device), torch.tensor([c + j for c, j in zip(t.cols, last)],
                                                                    device=v.device)]

    def _scores(self, seqs: list[list[int]]) -> torch.Tensor:
        return self._outputs(seqs)[:, 0]

    def _pair_loss(self, r1, r2, p, margin) -> torch.Tensor:
        """Summed (not mean) loss over the micro-batch's pairs."""
        n = r1.shape[0]
        lc = self.loss_cfg
        if lc.type == "bradley_terry":
            # Hard labels: the preferred response by p, ties count both ways.
            w = torch.where(p >= 0.5, r1, r2)
            l_ = torch.where(p >= 0.5, r2, r1)
            loss = bradley_terry_loss(w, l_, margin if lc.use_margin else 0.0) * n
        else:
            loss = soft_label_loss(r1, r2, p) * n
        if lc.centering > 0:
            loss = loss + centering_loss(r1, r2, lc.centering) * n
        return loss

    @dispatch(SPLIT)
    def train_step(self, pairs: list[dict], global_pairs: int) -> dict[str, list]:
        """One optimizer step; the loss is the mean over the global batch's pairs."""
        def loss_of(chunk):
            r = self._scores([c["ids_1"] for c in chunk] + [c["ids_2"] for c in chunk])
            r1, r2 = r[:len(chunk)], r[len(chunk):]
            p = torch.tensor([c["p"] for c in chunk], dtype=torch.float32, device=r.device)
            margin = torch.tensor([c.get("margin", 0.0) for c in chunk], dtype=torch.float32, device=r.device)
            loss = self._pair_loss(r1, r2, p, margin)
            decided = p != 0.5
            return loss, {"loss_sum": float(loss.detach()), "pairs": len(chunk),
                          "correct": int(((r1 > r2) == (p > 0.5))[decided].sum()),
                          "counted": int(decided.sum())}

        return self.accumulate(pairs, global_pairs, loss_of)

    @dispatch(SPLIT)
    def score_pairs(self, pairs: list[dict]) -> dict[str, list]:
        """Raw scores of both responses of each pair (evaluation)."""
        self.engine.eval()
        r1s, r2s = [], []
        mb = max(1, self.train_cfg.micro_batch_size)
        with torch.no_grad():
            for i in range(0, len(pairs), mb):
                chunk = pairs[i:i + mb]
                r = self._scores([c["ids_1"] for c in chunk] + [c["ids_2"] for c in chunk]).cpu()
                r1s += r[:len(chunk)].tolist()
                r2s += r[len(chunk):].tolist()
        self.engine.train()
        return {"r1": r1s, "r2": r2s}

    @dispatch(SPLIT)
    def score(self, seqs: list[list[int]], normalize: bool = True, batch_size: int = 8) -> list[float]:
        """Scores for encoded (prompt, response) sequences; normalised with the saved
        mean/std when available."""
        self.engine.eval()
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(seqs), batch_size):
                out += self._scores(seqs[i:i + batch_size]).cpu().tolist()
        self.engine.train()
        if normalize and self.stats:
            out = [(x - self.stats["mean"]) / max(self.stats["std"], 1e-6) for x in out]
        return out

    @dispatch(SPLIT)
    def score_texts(self, items: list[tuple[str, str]], normalize: bool = True, batch_size: int = 8) -> list[float]:
        """Scores for (prompt, response) texts, encoded with this model's own tokenizer."""
        from ..data import encode_rm

        seqs = [encode_rm(self.tok, p, r, self.max_length) for p, r in items]
        return self.score(seqs, normalize, batch_size)

    max_length = 512

    def after_load(self, src: Path) -> None:
        f = Path(src) / STATS_FILE
        if f.is_file():
            self.stats = json.loads(f.read_text())

    @dispatch(ALL)
    def set_stats(self, mean: float, std: float) -> bool:
        self.stats = {"mean": float(mean), "std": float(std)}
        return True

    def after_export(self, out: Path) -> None:
        if self.stats:
            (Path(out) / STATS_FILE).write_text(json.dumps(self.stats))


class AttributeWorker(RewardWorker):
    """SteerLM's attribute-prediction model: the reward role's model with one
    regression head per attribute (helpfulness, correctness, ... on 0–4), trained with a
    squared error on the attributes each example has a label for. The saved directory is a
    plain HF sequence-classification model whose labels name the attributes."""
    attributes: list[str] = []

    @dispatch(ALL)
    def set_attributes(self, names: list[str]) -> bool:
        """Before ``init_model``: the heads to build (a saved predictor must have the same)."""
        self.attributes = list(names)
        return True

    def load_kwargs(self) -> dict[str, Any]:
        if not self.attributes:
            raise ValueError("set_attributes before init_model: the predictor needs its attribute names")
        return {"num_labels": len(self.attributes), "id2label": dict(enumerate(self.attributes)),
                "label2id": {n: i for i, n in enumerate(self.attributes)}, "problem_type": "regression"}

    def prepare_module(self, module):
        names = [module.config.id2label[i] for i in range(module.config.num_labels)]
        if names != self.attributes:
            raise ValueError(f"the model's heads are {names}, this run's attributes {self.attributes}")
        return super().prepare_module(module)

    @dispatch(SPLIT)
    def attribute_step(self, items: list[dict], global_labels: int) -> dict[str, list]:
        """One optimizer step on ``{"ids", "y"}`` items (``y``: a value per attribute, None
        where unlabelled); the loss is the mean squared error over the global batch's
        labelled values."""
        def loss_of(chunk):
            pred = self._outputs([c["ids"] for c in chunk])
            y = torch.tensor([[float("nan") if v is None else v for v in c["y"]] for c in chunk],
                             device=pred.device)
            have = ~torch.isnan(y)
            err = torch.where(have, pred - torch.nan_to_num(y), torch.zeros_like(pred))
            loss = (err ** 2).sum()
            return loss, {"sse": float(loss.detach()), "labels": int(have.sum())}

        return self.accumulate(items, global_labels, loss_of)

    @dispatch(SPLIT)
    def predict(self, seqs: list[list[int]], batch_size: int = 8) -> list[list[float]]:
        """Each sequence's predicted attribute values (one per head, unclipped)."""
        self.engine.eval()
        out: list[list[float]] = []
        with torch.no_grad():
            for chunk, idle in self.lockstep_batches(seqs, batch_size):
                v = self._outputs(chunk).cpu().tolist()
                if not idle:
                    out += v
        self.engine.train()
        return out
