"""The Aligner's inference engine: plain Python, no Ray. The Serve replica wraps it; tests
and the GPU check call it directly."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..aligner import find_model_dir, read_meta, unjoin


def _growing_cache(layers: list[tuple[Any, Any]], room: int):
    """A transformers cache whose layers append into preallocated room: the stock dynamic
    layer concatenates, copying the whole cache at every decode step."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self, keys, values):
            super().__init__()
            b, h, n, d = keys.shape
            self._k = keys.new_empty((b, h, n + room, d))
            self._v = values.new_empty((b, h, n + room, values.shape[-1]))
            self._k[:, :, :n], self._v[:, :, :n] = keys, values
            self._n = n
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self._views()

        def _views(self):
            self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]

        def update(self, key_states, value_states, *args, **kwargs):
            q = key_states.shape[-2]
            if self._n + q > self._k.shape[2]:  # out of room: double it
                grow = max(q, self._k.shape[2])
                self._k = torch.cat([self._k, self._k.new_empty(self._k.shape[:2] + (grow, self._k.shape[3]))], 2)
                self._v = torch.cat([self._v, self._v.new_empty(self._v.shape[:2] + (grow, self._v.shape[3]))], 2)
            self._k[:, :, self._n:self._n + q] = key_states
            self._v[:, :, self._n:self._n + q] = value_states
            self._n += q
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices):
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    cache = DynamicCache()
    cache.layers = [GrowingLayer(k, v) for k, v in layers]
    return cache


_PACKED = "rayalign_packed"


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA, except for a packed prefill (``packed_segments`` given): there each prompt
    attends to the shared prefix and causally to itself, computed segment by segment. The
    one block-diagonal mask over the whole pack spent most of its attention on masked
    blocks (a fifth of the prefill for 16 prompts)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = kwargs.pop("packed_segments", None)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    c, spans = segments
    outs = []
    for s0, n in spans:
        k = torch.cat([key[:, :, :c], key[:, :, c + s0:c + s0 + n]], 2)
        v = torch.cat([value[:, :, :c], value[:, :, c + s0:c + s0 + n]], 2)
        mask = torch.ones((n, c + n), dtype=torch.bool, device=query.device).tril(c)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s0:s0 + n], k, v, attn_mask=mask, scale=scaling, enable_gqa=k.shape[1] != query.shape[1]))
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


def _register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_PACKED, _packed_attention)
    AttentionMaskInterface.register(_PACKED, sdpa_mask)


class AlignerEngine:
    def __init__(self, checkpoint: str | Path, dtype: str = "float32", threads: int | None = None,
                 device: str | None = None):
        import torch

        from ..models import load_causal_lm, load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        # Grouped-query attention inside SDPA even with a padding mask: otherwise transformers
        # repeats every cached key and value per query head at each decode step (the CPU
        # kernel takes the mask with GQA; CUDA's fast kernels do not, so only here).
        if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
            os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        self.model_dir = find_model_dir(checkpoint)
        self.template, self.meta = read_meta(self.model_dir)
        self.tok = load_tokenizer(self.model_dir)
        self.tok.padding_side = "left"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_causal_lm(self.model_dir, dtype).to(self.device).eval()
        self.model.config.use_cache = True
        self.packed = getattr(self.model.config, "_attn_implementation", None) == "sdpa"
        if self.packed:
            _register_packed_attention()
            self.model.config._attn_implementation = _PACKED
        self.name = self.meta.get("name") or self.model_dir.parent.name + "/" + self.model_dir.name

    def prompt(self, question: str, answer: str) -> str:
        from ..data import chat_prompt

        return chat_prompt(self.tok, self.template.render(question, answer))

    def input_tokens(self, question: str, answer: str) -> int:
        return len(self.tok(self.prompt(question, answer), add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------ generation

    def _prefix_cache(self):
        """KV of the prompt text every request shares (chat wrapper, system prompt, the
        template up to the question), computed once."""
        import torch

        marker = "\x00"
        text = self.prompt(marker, marker)
        ids = self.tok(text[:text.index(marker)], add_special_tokens=False)["input_ids"]
        if not ids:
            return [], None
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        return ids, [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _prefill(self, encoded: list[list[int]]):
        """All prompts in one packed sequence after the shared prefix's cached KV: each
        segment attends to the prefix and causally to itself only (a block-diagonal mask),
        so no token is padding and no prefix is computed twice. Returns each prompt's
        last logits and its own KV per layer."""
        import torch
        from transformers import DynamicCache

        if not hasattr(self, "_prefix"):
            self._prefix = self._prefix_cache()
        pre_ids, pre_kv = self._prefix
        c = 0  # tokens merged across the prefix boundary differ: reuse only what all rows share
        while (c < len(pre_ids) and all(len(ids) > c + 1 and ids[c] == pre_ids[c] for ids in encoded)):
            c += 1
        lens = [len(ids) - c for ids in encoded]
        total = sum(lens)
        dev = self.device
        flat = torch.tensor([t for ids in encoded for t in ids[c:]], device=dev)[None]
        pos = torch.cat([torch.arange(c, c + n, device=dev) for n in lens])[None]
        mask = torch.zeros((1, 1, total, c + total), dtype=torch.bool, device=dev)
        mask[..., :c] = True
        starts = [0]
        for n in lens:
            s0 = starts[-1]
            mask[0, 0, s0:s0 + n, c + s0:c + s0 + n] = torch.ones((n, n), dtype=torch.bool, device=dev).tril()
            starts.append(s0 + n)
        cache = DynamicCache(ddp_cache_data=[(k[:, :, :c], v[:, :, :c]) for k, v in pre_kv]) if c else DynamicCache()
        ends = torch.tensor([s0 + n - 1 for s0, n in zip(starts, lens)], device=dev)
        # Logits at each prompt's last token only: the LM head over every packed token
        # would cost as much again as a tenth of the prefill.
        extra = {"packed_segments": (c, list(zip(starts, lens)))} if self.packed else {}
        out = self.model(input_ids=flat, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=ends, **extra)
        rows = [[(torch.cat([layer.keys[:, :, :c], layer.keys[:, :, c + s0:c + s0 + n]], 2),
                  torch.cat([layer.values[:, :, :c], layer.values[:, :, c + s0:c + s0 + n]], 2))
                 for layer in out.past_key_values.layers] for s0, n in zip(starts, lens)]
        return out.logits[0], rows

    def _prefill_all(self, encoded: list[list[int]], pack_tokens: int = 2048):
        """Packs of about ``pack_tokens`` tokens (attention over a pack grows with its square,
        the matmuls are efficient long before), stacked into one left-padded batch: last
        logits, per-layer (keys, values), lengths."""
        import torch

        logits, rows, packs, cur, size = [], [], [], [], 0
        for i, ids in enumerate(encoded):
            if cur and size + len(ids) > pack_tokens:
                packs.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += len(ids)
        packs.append(cur)
        for pack in packs:
            lg, rw = self._prefill([encoded[i] for i in pack])
            logits.append(lg)
            rows += rw
        lens = [r[0][0].shape[2] for r in rows]
        width = max(lens)
        pad = torch.nn.functional.pad
        stacked = [(torch.cat([pad(r[li][0], (0, 0, width - n, 0)) for r, n in zip(rows, lens)]),
                    torch.cat([pad(r[li][1], (0, 0, width - n, 0)) for r, n in zip(rows, lens)]))
                   for li in range(len(rows[0]))]
        return torch.cat(logits), stacked, lens

    @staticmethod
    def _pick(logits, temperature: float, top_p: float):
        """The next token of each row: greedy at temperature 0, else sampled from the top-p
        head of softmax(logits / temperature). Safe for every temperature > 0 down to the
        smallest float: in float64 (where such a temperature is not 0, as in float32), the
        logits are shifted to a maximum of 0 before the division, so a tiny temperature
        sends the rest to -inf (greedy in the limit) instead of making inf - inf = NaN."""
        import torch

        if temperature <= 0:
            return logits.argmax(-1)
        z = logits.double()
        z = (z - z.max(-1, keepdim=True).values) / temperature
        probs = torch.softmax(z, -1)
        if top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            drop = sp.cumsum(-1) - sp > top_p  # keep the smallest head reaching top_p (at least one)
            sp = sp.masked_fill(drop, 0.0)
            return si.gather(-1, torch.multinomial(sp, 1)).squeeze(-1)
        return torch.multinomial(probs, 1).squeeze(-1)

    def correct(self, items: list[tuple[str, str]], max_new_tokens: int = 128, temperature: float = 0.0,
                top_p: float = 1.0, min_new_tokens: int = 0) -> list[dict[str, Any]]:
        """Corrections of (question, answer) items generated together.

        The prompts are prefilled packed, without padding, after the shared prefix's
        cached KV (on a CPU the prefill is half the work, and padding a batch to its
        longest prompt wasted a quarter of it, the shared prefix another fifth); then all
        rows decode as one left-padded batch, and a row leaves the batch when it ends.
        """
        import torch

        if not items:
            return []
        eos = self.tok.eos_token_id
        with torch.inference_mode():
            encoded = [self.tok(self.prompt(q, a), add_special_tokens=False)["input_ids"] for q, a in items]
            logits, stacked, lens = self._prefill_all(encoded)
            cache = _growing_cache(stacked, max_new_tokens)
            width = max(lens)
            mask = torch.zeros((len(items), width), dtype=torch.long, device=self.device)
            for i, n in enumerate(lens):
                mask[i, width - n:] = 1
            pos = torch.tensor(lens, device=self.device)
            alive = list(range(len(items)))
            out_ids: list[list[int]] = [[] for _ in items]
            for step in range(max_new_tokens):
                if step < min_new_tokens:
                    logits[:, eos] = float("-inf")
                nxt = self._pick(logits, temperature, top_p)
                keep = []
                for j, (row, t) in enumerate(zip(alive, nxt.tolist())):
                    if t == eos:  # (a pad token is kept, as generate keeps it, and decoded away)
                        continue
                    out_ids[row].append(t)
                    keep.append(j)
                if not keep or step == max_new_tokens - 1:
                    break
                if len(keep) < len(alive):
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    mask, pos, nxt = mask[idx], pos[idx], nxt[idx]
                    alive = [alive[j] for j in keep]
                mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=self.device)], 1)
                out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                                 past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1]
                pos = pos + 1
        res = []
        for (q, a), ids in zip(items, out_ids):
            text = unjoin(self.tok.decode(ids, skip_special_tokens=True)).strip()
            res.append({"correction": text, "copied": text == a.strip(), "new_tokens": len(ids),
                        "truncated": len(ids) == max_new_tokens})
        return res

    def correct_with_generate(self, items: list[tuple[str, str]], max_new_tokens: int = 128) -> list[str]:
        """Greedy corrections through transformers' own ``generate`` on a padded batch: the
        reference the engine's decoding is checked against."""
        import torch

        enc = self.tok([self.prompt(q, a) for q, a in items], return_tensors="pt", padding=True,
                       add_special_tokens=False).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        return [t.strip() for t in self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]

