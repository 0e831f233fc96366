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


def pack_samples(samples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad prompt+response sequences. Returns ids, attention mask, and an action mask
    in the *shifted* frame [B, T-1]: position i scores token i+1, so response token j of a
    sample with prompt length P sits at shifted index P-1+j."""
    seqs = [list(s["prompt_ids"]) + list(s["response_ids"]) for s in samples]
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    act = torch.zeros((len(seqs), max(1, width - 1)), dtype=torch.float32)
    for i, (s, x) in enumerate(zip(samples, seqs)):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        attn[i, :len(x)] = 1
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        act[i, p - 1:p - 1 + r] = 1
    return ids, attn, act


def response_slices(frame: torch.Tensor, samples: list[dict]) -> list[list[float]]:
    """Per-sample response values out of a shifted-frame tensor [B, T-1]."""
    out = []
    for i, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        out.append(frame[i, p - 1:p - 1 + r].tolist())
    return out


def to_frame(values: list[list[float]], samples: list[dict], width: int) -> torch.Tensor:
    """Inverse of :func:`response_slices`: per-sample response lists into a [B, width] frame."""
    out = torch.zeros((len(samples), width), dtype=torch.float32)
    for i, (s, v) in enumerate(zip(samples, values)):
        p = len(s["prompt_ids"])
        out[i, p - 1:p - 1 + len(v)] = torch.tensor(v, dtype=torch.float32)
    return out
