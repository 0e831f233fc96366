"""Language-model losses as pure functions over tensors and masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def count_targets(labels: torch.Tensor) -> int:
    """Tokens a causal LM is scored on: every label after the first that is not IGNORE."""
    return int((labels[..., 1:] != IGNORE).sum())


def shifted_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood and the number of scored tokens.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; IGNORE labels (prompt, padding) do not
    count. Returning the *sum* lets the caller normalise by the token count of the whole
    global batch, which keeps 1-rank and N-rank training numerically the same.
    """
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, int((target != IGNORE).sum())


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens[:, t+1] | ...) for every position, shape [B, T-1]."""
    logp = torch.log_softmax(logits[:, :-1, :].float() / temperature, dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
