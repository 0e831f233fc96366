"""Language-model losses as pure functions over tensors and masks, and the one layout of
token sequences every forward uses (right-padded rows, or packed into one row)."""
from __future__ import annotations

from dataclasses import dataclass

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
    """log p(tokens[:, t+1] | ...) for every position, shape [B, T-1], logits divided by
    the sampling temperature. The one token log-prob computation: the policy's old and new
    log-probs, the reference's and the labeler's continuation scores all come from here."""
    logp = torch.log_softmax(logits[:, :-1, :].float() / temperature, dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


@dataclass
class Tokens:
    """Token sequences laid out for one forward.

    Padded: one right-padded row per sequence, with an attention mask. Packed: sequences
    placed one after another in rows as wide as the longest of them (first fit, longest
    first), position ids restarting at 0 for each, so the model's attention stays inside
    each sequence (transformers builds that block-diagonal causal mask from the position
    ids; flash-attention reads them as variable lengths). Only a row's unused end is
    padding (a segment of its own). Rows no wider than the padded layout's keep attention's
    cost at or below the padded one's: one row of every sequence would cost the square of
    the micro-batch's total length.
    Sequence ``i`` starts at ``(rows[i], cols[i])``; its token ``t`` is scored (predicted)
    at ``(rows[i], cols[i] + t - 1)`` of the shifted frame ``[R, W-1]``.
    """
    ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    rows: list[int]
    cols: list[int]
    lengths: list[int]

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    def inputs(self, device) -> dict[str, torch.Tensor]:
        """Keyword arguments for an HF model's forward."""
        if self.packed:
            return {"input_ids": self.ids.to(device), "position_ids": self.position_ids.to(device)}
        return {"input_ids": self.ids.to(device), "attention_mask": self.attention_mask.to(device)}

    def frame_shape(self) -> tuple[int, int]:
        return self.ids.shape[0], max(1, self.ids.shape[1] - 1)

    def span_mask(self, starts: list[int], lengths: list[int]) -> torch.Tensor:
        """[R, W-1] float mask over the shifted positions that score tokens
        ``starts[i] .. starts[i] + lengths[i] - 1`` of each sequence (``starts[i] >= 1``)."""
        m = torch.zeros(self.frame_shape(), dtype=torch.float32)
        for r, c, s, n in zip(self.rows, self.cols, starts, lengths):
            m[r, c + s - 1:c + s - 1 + n] = 1
        return m

    def slices(self, frame: torch.Tensor, starts: list[int], lengths: list[int]) -> list[list[float]]:
        """Per-sequence values out of a shifted frame, for the same spans as :meth:`span_mask`."""
        return [frame[r, c + s - 1:c + s - 1 + n].tolist()
                for r, c, s, n in zip(self.rows, self.cols, starts, lengths)]

    def to_frame(self, values: list[list[float]], starts: list[int]) -> torch.Tensor:
        """Inverse of :meth:`slices`: per-sequence lists into a float frame."""
        out = torch.zeros(self.frame_shape(), dtype=torch.float32)
        for r, c, s, v in zip(self.rows, self.cols, starts, values):
            out[r, c + s - 1:c + s - 1 + len(v)] = torch.tensor(v, dtype=torch.float32)
        return out

    def last_positions(self) -> tuple[list[int], list[int]]:
        """(row, column) of each sequence's last token (where a reward head reads)."""
        return self.rows, [c + n - 1 for c, n in zip(self.cols, self.lengths)]

    def flat(self, frame: torch.Tensor) -> torch.Tensor:
        """A per-position tensor [R, W, ...] in the sequences' own order, padding dropped
        (sequence i's tokens, then sequence i+1's)."""
        return torch.cat([frame[r, c:c + n] for r, c, n in zip(self.rows, self.cols, self.lengths)])


def layout(seqs: list[list[int]], pad_id: int, packed: bool = False) -> Tokens:
    """Lay out token sequences for one forward, right-padded or packed (see :class:`Tokens`)."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("layout: every sequence needs at least one token")
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    if packed:
        rows, cols, fill = [0] * len(seqs), [0] * len(seqs), []
        for i in sorted(range(len(seqs)), key=lambda k: -lengths[k]):
            r = next((j for j, used in enumerate(fill) if used + lengths[i] <= width), len(fill))
            if r == len(fill):
                fill.append(0)
            rows[i], cols[i] = r, fill[r]
            fill[r] += lengths[i]
        ids = torch.full((len(fill), width), pad_id, dtype=torch.long)
        pos = torch.zeros_like(ids)
        for s, r, c in zip(seqs, rows, cols):
            ids[r, c:c + len(s)] = torch.tensor(s, dtype=torch.long)
            pos[r, c:c + len(s)] = torch.arange(len(s))
        for r, used in enumerate(fill):
            pos[r, used:] = torch.arange(width - used)  # the unused end: a segment of its own
        return Tokens(ids, None, pos, rows, cols, lengths)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, :len(s)] = 1
    return Tokens(ids, attn, None, list(range(len(seqs))), [0] * len(seqs), lengths)


def layout_labeled(examples: list[dict], pad_id: int, packed: bool = False) -> tuple[Tokens, torch.Tensor]:
    """SFT examples (``input_ids`` and ``labels``) laid out, with labels in the same layout
    (IGNORE on padding). Packed, each sequence's first label is IGNORE too: it would be
    scored from the previous sequence's last position."""
    t = layout([list(e["input_ids"]) for e in examples], pad_id, packed)
    labels = torch.full(t.ids.shape, IGNORE, dtype=torch.long)
    for r, c, e in zip(t.rows, t.cols, examples):
        lab = torch.tensor(list(e["labels"]), dtype=torch.long)
        if packed:
            lab[0] = IGNORE
        labels[r, c:c + len(lab)] = lab
    return t, labels


def sample_layout(samples: list[dict], pad_id: int, packed: bool = False) -> tuple[Tokens, torch.Tensor]:
    """Rollout samples (prompt + response) laid out, and the action mask over the shifted
    frame: the positions that score response tokens."""
    t = layout([list(s["prompt_ids"]) + list(s["response_ids"]) for s in samples], pad_id, packed)
    return t, t.span_mask(*response_spans(samples))


def response_spans(samples: list[dict]) -> tuple[list[int], list[int]]:
    """Where each sample's response starts in its sequence, and its length."""
    return [len(s["prompt_ids"]) for s in samples], [len(s["response_ids"]) for s in samples]


def response_slices(frame: torch.Tensor, tokens: Tokens, samples: list[dict]) -> list[list[float]]:
    """Per-sample response values out of a shifted frame."""
    return tokens.slices(frame, *response_spans(samples))


def response_sums(frame: torch.Tensor, tokens: Tokens, samples: list[dict]) -> torch.Tensor:
    """Each sample's response values summed, [N], keeping the graph (DPO's sequence
    log-probabilities, in any layout)."""
    starts, lengths = response_spans(samples)
    return torch.stack([frame[r, c + s - 1:c + s - 1 + n].sum()
                        for r, c, s, n in zip(tokens.rows, tokens.cols, starts, lengths)])


def to_frame(values: list[list[float]], tokens: Tokens, samples: list[dict]) -> torch.Tensor:
    """Inverse of :func:`response_slices`: per-sample response lists into a frame."""
    return tokens.to_frame(values, response_spans(samples)[0])


def common_prefix_len(seqs: list[list[int]]) -> int:
    """The number of leading tokens every sequence shares."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for k in range(n):
        t = first[k]
        if any(s[k] != t for s in seqs):
            return k
    return n


def prefix_groups(seqs: list[list[int]], start: int, min_shared: int) -> list[tuple[list[int], int]]:
    """Sequences that share more than their first ``start`` tokens, grouped so that each
    shared stretch is encoded once: ``[(members, shared)]``, members in lexicographic order
    of their tokens past ``start`` and ``shared`` the further tokens all members have in
    common (0 for a sequence alone). A group forms only where at least ``min_shared``
    tokens are shared, and every member keeps one token of its own after the shared part,
    so each sequence's last position is still computed on its own. A judge's two orders of
    one pair share the question; its prompts all share the chat template's opening."""
    order = sorted(range(len(seqs)), key=lambda i: seqs[i][start:])
    groups: list[tuple[list[int], int]] = []
    for i in order:
        if groups:
            members, shared = groups[-1]
            last = seqs[members[-1]]
            k = common_prefix_len([last[start:], seqs[i][start:]])
            k = min(k, shared if len(members) > 1 else k, len(seqs[i]) - start - 1,
                    min(len(seqs[m]) for m in members) - start - 1)
            if k >= min_shared:
                groups[-1] = (members + [i], k)
                continue
        groups.append(([i], 0))
    return groups
