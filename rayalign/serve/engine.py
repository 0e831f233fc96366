"""The Aligner's inference engine: plain Python, no Ray. The Serve replica wraps it; tests
and the GPU check call it directly."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator

from ..aligner import find_model_dir, read_meta, unjoin

_log = logging.getLogger(__name__)


class TextStream:
    """One item's generated tokens as text, in deltas that add up to the final correction
    (stripped, joiners removed): leading whitespace is never sent, trailing whitespace
    and an unfinished UTF-8 sequence wait for what follows."""

    def __init__(self, tok, answer: str, limit: int):
        self.tok, self.answer, self.limit = tok, answer, limit
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False

    def _text(self) -> str:
        return unjoin(self.tok.decode(self.ids, skip_special_tokens=True)).strip()

    def push(self, token: int) -> dict[str, Any] | None:
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return None
        if not text.startswith(self.sent):  # decoding merged across tokens: resend nothing, end exact
            return None
        delta = text[len(self.sent):]
        self.sent = text
        return {"delta": delta} if delta else None

    def end(self) -> dict[str, Any]:
        self.ended = True
        text = self._text()
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return {"delta": delta, "result": {"correction": text, "copied": text == self.answer.strip(),
                                           "new_tokens": len(self.ids), "truncated": len(self.ids) >= self.limit}}


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

    def _pick_rows(self, logits, options: list[tuple[float, float]]):
        """:meth:`_pick` with each row's own (temperature, top_p): rows sharing a setting
        are drawn together."""
        import torch

        if len(set(options)) == 1:
            return self._pick(logits, *options[0])
        out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, o in enumerate(options):
            groups.setdefault(o, []).append(i)
        for (t, p), rows in groups.items():
            idx = torch.tensor(rows, device=logits.device)
            out[idx] = self._pick(logits[idx], t, p)
        return out

    def token_steps(self, items: list[tuple[str, str]], options: list[tuple[int, float, float]],
                    min_new_tokens: int = 0, resume: list[list[int]] | None = None
                    ) -> Iterator[tuple[dict[int, int], list[int]]]:
        """Generates the corrections of (question, answer) items together, one decode step
        per yield: ``({row: new token id}, [rows that ended])``. Each row has its own
        ``(max_new_tokens, temperature, top_p)``; ``resume[row]`` are tokens it already
        generated (a row continues after them, and they count towards its limit).

        The prompts are prefilled packed, without padding, after the shared prefix's
        cached KV (on a CPU the prefill is half the work, and padding a batch to its
        longest prompt wasted a quarter of it, the shared prefix another fifth); then all
        rows decode as one left-padded batch, and a row leaves the batch when it ends.
        """
        import torch

        if not items:
            return
        resume = resume or [[] for _ in items]
        eos = self.tok.eos_token_id
        with torch.inference_mode():
            encoded = [self.tok(self.prompt(q, a), add_special_tokens=False)["input_ids"] + list(done)
                       for (q, a), done in zip(items, resume)]
            counts = [len(done) for done in resume]
            room = max(1, max(n - c for (n, _, _), c in zip(options, counts)))
            logits, stacked, lens = self._prefill_all(encoded)
            cache = _growing_cache(stacked, room)
            width = max(lens)
            mask = torch.zeros((len(items), width), dtype=torch.long, device=self.device)
            for i, n in enumerate(lens):
                mask[i, width - n:] = 1
            pos = torch.tensor(lens, device=self.device)
            alive = list(range(len(items)))
            while True:
                early = [j for j, row in enumerate(alive) if counts[row] < min_new_tokens]
                if early:
                    logits[early, eos] = float("-inf")
                nxt = self._pick_rows(logits, [options[row][1:] for row in alive])
                new, ended, keep = {}, [], []
                for j, (row, t) in enumerate(zip(alive, nxt.tolist())):
                    if counts[row] >= options[row][0] or t == eos:
                        ended.append(row)  # (a pad token is kept, as generate keeps it, and decoded away)
                        continue
                    new[row] = t
                    counts[row] += 1
                    if counts[row] >= options[row][0]:
                        ended.append(row)
                    else:
                        keep.append(j)
                yield new, ended
                if not keep:
                    return
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

    def stream(self, items: list[tuple[str, str]], options: list[tuple[int, float, float]],
               min_new_tokens: int = 0) -> Iterator[list[dict[str, Any] | None]]:
        """:meth:`token_steps` as text, isolated: per step a list with each item's event,
        ``None`` (nothing new), ``{"delta": text}``, or at its end ``{"delta": text,
        "result": {...}}`` or ``{"error": message}``. The deltas of an item add up to its
        ``result["correction"]``. If the batch fails, its unfinished items go on one by one
        from the tokens they have (so nothing streamed is taken back), and only an item that
        fails alone gets an error."""
        texts = [TextStream(self.tok, a, n) for (_, a), (n, _, _) in zip(items, options)]

        def run(rows: list[int]):
            steps = self.token_steps([items[r] for r in rows], [options[r] for r in rows], min_new_tokens,
                                     [texts[r].ids for r in rows])
            for new, ended in steps:
                events: list[dict[str, Any] | None] = [None] * len(items)
                for j, t in new.items():
                    events[rows[j]] = texts[rows[j]].push(t)
                for j in ended:
                    pushed = events[rows[j]]
                    events[rows[j]] = end = texts[rows[j]].end()
                    if pushed:  # its last token's text
                        end["delta"] = pushed["delta"] + end["delta"]
                yield events

        try:
            yield from run(list(range(len(items))))
            return
        except Exception as exc:
            left = [r for r, t in enumerate(texts) if not t.ended]
            failure = f"{type(exc).__name__}: {str(exc)[:200]}"
            if len(items) == 1:
                yield [{"error": failure}]
                return
            _log.warning("a batch of %d failed (%s); its %d unfinished items go on one by one",
                         len(items), failure, len(left))
        for r in left:
            try:
                yield from run([r])
            except Exception as exc:
                events: list[dict[str, Any] | None] = [None] * len(items)
                events[r] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                texts[r].ended = True
                yield events

    def correct(self, items: list[tuple[str, str]], max_new_tokens: int = 128, temperature: float = 0.0,
                top_p: float = 1.0, min_new_tokens: int = 0,
                options: list[tuple[int, float, float]] | None = None) -> list[dict[str, Any]]:
        """The corrections of (question, answer) items, generated together (see
        :meth:`stream`): each item's ``result``, or ``{"error": ...}`` for an item that
        failed alone."""
        options = options or [(max_new_tokens, temperature, top_p)] * len(items)
        out: list[dict[str, Any]] = [{} for _ in items]
        for events in self.stream(items, options, min_new_tokens):
            for i, e in enumerate(events):
                if e is not None and ("result" in e or "error" in e):
                    out[i] = e.get("result") or {"error": e["error"]}
        return out

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

