"""A frozen causal LM: every role that only runs a model forward. It is PPO's reference
(token log-probs), the AI labeler (scores of candidate next tokens, rationales), the sampler
of label pairs and the Aligner's upstream (generation), and the evaluation judge.

Inference only. Under ZeRO-3 the parameters stay partitioned across the group's ranks and
are gathered layer by layer in each forward; every rank must then run the same number of
forwards, so the ranks agree on a batch count first and pad with idle batches.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..cluster.worker import ALL, SPLIT, Worker, dispatch
from ..config import ModelConfig, ZeroConfig


class FrozenLMWorker(Worker):
    model = None
    tok = None

    @dispatch(ALL)
    def init_model(self, model: dict, zero: dict | None = None, chat: bool = True) -> dict[str, Any]:
        """Load the model for inference (partitioned across the ranks under ZeRO-3)."""
        from ..models import load_tokenizer, resolve

        t0 = time.time()
        from ..models import choose_dtype

        self.model_cfg = ModelConfig.model_validate(model)
        self.model_cfg.dtype, dtype_reason = choose_dtype(self.model_cfg.dtype, trains=False,
                                                          device=self.device.type)
        self.zero = ZeroConfig.model_validate(zero or {})
        path = resolve(self.model_cfg.name, self.model_cfg.seed, self.model_cfg.overrides, say=lambda s: None)
        self.tok = load_tokenizer(path)
        self.tok.padding_side = "left"  # the scored position is the last one for every row
        self.chat = chat and bool(self.tok.chat_template)
        dtype = getattr(torch, self.model_cfg.dtype)
        from transformers import AutoModelForCausalLM

        module = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        module.eval()
        if self.zero.stage == 3 and self.world_size > 1:
            import deepspeed

            from ..cluster.engine import ds_config, hidden_size_of

            cfg = ds_config(self.zero, 1, 1, self.world_size, 0.0, self.model_cfg.dtype,
                            self.device.type == "cuda", hidden_size_of(module))
            engine, *_ = deepspeed.initialize(model=module, config=cfg)
            self.model = engine.module
            self.lockstep = True
        else:
            self.model = module.to(self.device)
            self.lockstep = False
        self.packing = self.model_cfg.packing and self.check_packing(
            self.per_token, min(int(module.config.vocab_size), len(self.tok)))
        return {"load_s": time.time() - t0, "chat": self.chat, "packing": self.packing,
                "dtype": self.model_cfg.dtype, "dtype_reason": dtype_reason,
                "params": sum(int(getattr(p, "ds_numel", p.numel())) for p in self.model.parameters())}

    # ------------------------------------------------------------ helpers

    def per_token(self, tokens) -> torch.Tensor:
        # No cache: transformers reads packed position ids only without one.
        return self.model(**tokens.inputs(self.device), use_cache=False).logits

    def _span_logprobs(self, seqs: list[list[int]], starts: list[int], temperature: float = 1.0) -> list[list[float]]:
        """log p of each sequence's tokens from ``starts[i]`` on, one forward in this rank's layout."""
        from ..algos.lm import layout, sequence_logprobs

        t = layout(seqs, self.tok.pad_token_id, self.packing)
        with torch.no_grad():
            lp = sequence_logprobs(self.per_token(t), t.ids.to(self.device), temperature).cpu()
        return t.slices(lp, starts, [len(s) - k for s, k in zip(seqs, starts)])

    def render(self, text: str) -> str:
        """A labeling prompt as the model expects a user turn, ready for the answer."""
        if self.chat:
            return self.tok.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=False)
        return text

    def _option_tokens(self, option: str) -> list[list[int]]:
        """Token sequences for each way the option can start (bare, or after a space)."""
        seqs = []
        for variant in (option, " " + option):
            toks = self.tok(variant, add_special_tokens=False)["input_ids"]
            if toks and toks not in seqs:
                seqs.append(toks)
        return seqs

    # ------------------------------------------------------------ group methods

    def _last_logprobs(self, texts: list[str], batch_size: int, share: bool = True) -> list[torch.Tensor]:
        """log-softmax of the next token after each (already rendered) text. Texts are batched
        in order of length, so that a batch pads little (a judge's prompts differ in length
        by their questions and answers; padding is compute spent on nothing). Outside
        lockstep, stretches the texts share are encoded once (``_shared_prefix_logprobs``)."""
        if share and not self.lockstep and len(texts) > 1:
            return self._shared_prefix_logprobs(texts, batch_size)
        lengths = [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        rows: list[torch.Tensor | None] = [None] * len(texts)
        for idx, idle in self.lockstep_batches(order, batch_size, idle_item=-1):
            chunk = [texts[i] if i >= 0 else "x" for i in idx]
            enc = self.tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc, logits_to_keep=1).logits[:, -1, :].float()
            if not idle:
                for i, row in zip(idx, torch.log_softmax(logits, dim=-1).cpu()):
                    rows[i] = row
        return rows  # type: ignore[return-value]

    # A stretch shared by two or more prompts is encoded once where it is at least this long.
    SHARED_MIN_TOKENS = 8

    def _shared_prefix_logprobs(self, texts: list[str], batch_size: int) -> list[torch.Tensor]:
        """``_last_logprobs`` computed once per shared stretch: the opening every prompt
        shares (the chat template's system turn, 29 of a pairwise prompt's ~75 tokens for
        Qwen2.5) is encoded once, a stretch a few prompts share (a question judged in both
        orders) once per group, and then each prompt's own tail on those keys and values.
        Positions are passed explicitly, so each token sits where it would in its own
        unpadded prompt and the result is the plain forward's, to float rounding."""
        import copy

        from transformers import DynamicCache

        from ..algos.lm import common_prefix_len, prefix_groups

        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        rows: list[torch.Tensor | None] = [None] * len(texts)
        if not ids:
            return []
        p0 = min(common_prefix_len(ids), min(len(s) for s in ids) - 1)
        if p0 < 1:
            return self._last_logprobs(texts, batch_size, share=False)
        pad = self.tok.pad_token_id
        dev = self.device
        with torch.no_grad():
            head = self.model(input_ids=torch.tensor([ids[0][:p0]], device=dev), use_cache=True,
                              logits_to_keep=1).past_key_values
        if not isinstance(head, DynamicCache):
            return self._last_logprobs(texts, batch_size, share=False)
        groups = prefix_groups(ids, p0, self.SHARED_MIN_TOKENS)
        groups.sort(key=lambda g: max(len(ids[m]) for m in g[0]))  # little padding per batch
        batches, cur = [], []
        for g in groups:
            cur.append(g)
            if sum(len(m) for m, _ in cur) >= batch_size:
                batches.append(cur)
                cur = []
        if cur:
            batches.append(cur)

        def left_padded(seqs: list[list[int]], starts: list[int]):
            w = max(len(s) for s in seqs)
            t = torch.full((len(seqs), w), pad, dtype=torch.long)
            m = torch.zeros((len(seqs), w), dtype=torch.long)
            pos = torch.zeros((len(seqs), w), dtype=torch.long)
            for r, (s, at) in enumerate(zip(seqs, starts)):
                if s:
                    t[r, w - len(s):] = torch.tensor(s)
                    m[r, w - len(s):] = 1
                    pos[r, w - len(s):] = torch.arange(at, at + len(s))
            return t.to(dev), m.to(dev), pos.to(dev)

        for batch in batches:
            cache = copy.deepcopy(head)
            cache.batch_repeat_interleave(len(batch))
            mask = torch.ones((len(batch), p0), dtype=torch.long, device=dev)
            shared = [ids[m[0]][p0:p0 + k] for m, k in batch]
            with torch.no_grad():
                if any(shared):
                    t, m, pos = left_padded(shared, [p0] * len(batch))
                    mask = torch.cat([mask, m], 1)
                    self.model(input_ids=t, attention_mask=mask, position_ids=pos, past_key_values=cache,
                               use_cache=True, logits_to_keep=1)
                who = [(gi, i) for gi, (members, _) in enumerate(batch) for i in members]
                cache.batch_select_indices(torch.tensor([gi for gi, _ in who], device=dev))
                tails = [ids[i][p0 + batch[gi][1]:] for gi, i in who]
                t, m, pos = left_padded(tails, [p0 + batch[gi][1] for gi, _ in who])
                mask = torch.cat([mask[[gi for gi, _ in who]], m], 1)
                logits = self.model(input_ids=t, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                    use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
            for (_, i), row in zip(who, torch.log_softmax(logits, dim=-1).cpu()):
                rows[i] = row
        return rows  # type: ignore[return-value]

    def _logprobs_with_extensions(self, texts: list[str], prefixes: list[list[tuple[int, ...]]],
                                  batch_size: int) -> tuple[list[torch.Tensor], dict]:
        """log-softmax of the next token after each text, and after each text followed by each
        of its token ``prefixes``: ``(first, {(i, prefix): row})``. A text's keys and values are
        computed once and each prefix is a few more positions on them, instead of the whole
        prompt encoded again per prefix (which doubled a pairwise judgement's cost)."""
        if not any(prefixes):  # single-token options (A/B, Yes/No): one position per text
            return self._last_logprobs(texts, batch_size), {}
        lengths = [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        first: list[torch.Tensor | None] = [None] * len(texts)
        ext: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        pad = self.tok.pad_token_id
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            enc = self.tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(self.device)
            width = enc["input_ids"].shape[1]
            rounds = max(len(prefixes[i]) for i in idx)
            with torch.no_grad():
                o = self.model(**enc, use_cache=rounds > 0, logits_to_keep=1)
                for r, i in enumerate(idx):
                    first[i] = torch.log_softmax(o.logits[r, -1].float(), -1).cpu()
                cache = o.past_key_values if rounds else None
                for j in range(rounds):
                    rows = [prefixes[i][j] if j < len(prefixes[i]) else () for i in idx]
                    n = max(len(p) for p in rows)
                    ids = torch.full((len(idx), n), pad, dtype=torch.long)
                    for r, p in enumerate(rows):  # after the text (left-padded: it ends at one column)
                        if p:
                            ids[r, :len(p)] = torch.tensor(p)
                    mask = torch.cat([enc["attention_mask"], torch.ones((len(idx), n), dtype=enc["attention_mask"].dtype,
                                                                       device=self.device)], 1)
                    logits = self.model(input_ids=ids.to(self.device), attention_mask=mask, past_key_values=cache,
                                        use_cache=True).logits.float()
                    cache.crop(width)  # back to the texts for the next round of prefixes
                    for r, (i, p) in enumerate(zip(idx, rows)):
                        if p:
                            ext[(i, tuple(p))] = torch.log_softmax(logits[r, len(p) - 1], -1).cpu()
        return first, ext  # type: ignore[return-value]

    @dispatch(SPLIT)
    def option_logprobs(self, items: list[tuple[str, list[str]]], batch_size: int = 8) -> list[list[float]]:
        """For each (prompt, options): log P(answer starts with option | rendered prompt).

        Single-token options cost one forward per batch of prompts. A multi-token option
        (say "10" as "1","0") is scored as a sequence with extra forwards, and a shorter
        option that is its prefix ("1") keeps only the mass that does not continue into it.
        """
        rendered = [self.render(t) for t, _ in items]
        seqs = [[self._option_tokens(o) for o in options] for _, options in items]
        # Every extension prefix needed by a multi-token option (" 1" is " ", "1" in Qwen's
        # vocabulary, so nearly every prompt has one).
        ext_keys: list[tuple[int, tuple[int, ...]]] = []
        for i, per_opt in enumerate(seqs):
            for variants in per_opt:
                for toks in variants:
                    for k in range(1, len(toks)):
                        key = (i, tuple(toks[:k]))
                        if key not in ext_keys:
                            ext_keys.append(key)
        if not self.lockstep:
            per_item: list[list[tuple[int, ...]]] = [[] for _ in items]
            for i, prefix in ext_keys:
                per_item[i].append(prefix)
            first, ext = self._logprobs_with_extensions(rendered, per_item, batch_size)
        else:
            # Ranks of a sharded model must run the same forwards: a batched pass of the
            # prompts, then one of the extended prompts.
            first = self._last_logprobs(rendered, batch_size)
            ext_texts = [rendered[i] + self.tok.decode(list(prefix)) for i, prefix in ext_keys]
            ext = dict(zip(ext_keys, self._last_logprobs(ext_texts, batch_size))) if ext_keys else {}
            if not ext_keys:
                self._last_logprobs([], batch_size)  # match the other ranks' extension pass
        out = []
        for i, per_opt in enumerate(seqs):
            probs = []
            for variants in per_opt:
                total = 0.0
                for toks in variants:
                    lp = float(first[i][toks[0]])
                    for k in range(1, len(toks)):
                        lp += float(ext[(i, tuple(toks[:k]))][toks[k]])
                    total += math.exp(lp)
                probs.append(total)
            flat = [[t for v in variants for t in v[:1]] for variants in per_opt]
            for a, va in enumerate(per_opt):
                for b, vb in enumerate(per_opt):
                    if a != b and all(len(x) == 1 for x in va) and any(len(y) > 1 and y[0] in flat[a] for y in vb):
                        probs[a] = max(probs[a] - probs[b], probs[a] * 1e-6)
            out.append([math.log(max(p, 1e-30)) for p in probs])
        return out

    @dispatch(SPLIT)
    def question_logprobs(self, items: list[str], questions: list[str], options: list[str],
                          batch_size: int = 8) -> list[list[list[float]]]:
        """Several questions about one text, at the cost of one: for each text, log P(first
        token of each option) after ``text + question`` (rendered as one user turn), for every
        question. The text's keys and values are computed once and reused by each question
        (per-criterion judging asks 3-5 questions about the same response). Options must
        start with distinct tokens. Texts are batched by length, so padding stays small."""
        marker = "\x00"
        rendered = self.render(marker)
        if rendered.count(marker) != 1:
            raise ValueError("the chat template repeats or drops the user text; cannot share a prefix")
        head, tail = rendered.split(marker)
        q_ids = [self.tok(q + tail, add_special_tokens=False)["input_ids"] for q in questions]
        # An option is scored by its first token (Yes/No are one token each in real vocabularies;
        # a character-level test vocabulary still tells Y from N).
        opt_ids = [(self.tok(o, add_special_tokens=False)["input_ids"] or [None])[0] for o in options]
        if None in opt_ids or len(set(opt_ids)) != len(opt_ids):
            raise ValueError(f"question_logprobs: options {options} do not start with distinct tokens")
        enc = [self.tok(head + t, add_special_tokens=False)["input_ids"] for t in items]
        order = sorted(range(len(items)), key=lambda i: len(enc[i]))
        out: list[list[list[float]] | None] = [None] * len(items)
        pad = self.tok.pad_token_id
        for idx, idle in self.lockstep_batches(order, batch_size, idle_item=-1):
            rows = [enc[i] if i >= 0 else [pad] for i in idx]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, sq in enumerate(rows):  # left padding: every row's text ends at the same column
                ids[r, width - len(sq):] = torch.tensor(sq)
                mask[r, width - len(sq):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            per_q = []
            with torch.no_grad():
                cache = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).past_key_values
                for qi in q_ids:
                    q = torch.tensor([qi] * len(rows), device=self.device)
                    m = torch.cat([mask, torch.ones_like(q)], 1)
                    logits = self.model(input_ids=q, attention_mask=m, past_key_values=cache, use_cache=True,
                                        logits_to_keep=1).logits[:, -1].float()
                    cache.crop(-q.shape[1])  # back to the shared text for the next question
                    per_q.append(torch.log_softmax(logits, -1)[:, opt_ids].cpu())
            for r, i in enumerate([] if idle else idx):
                out[i] = [per_q[k][r].tolist() for k in range(len(q_ids))]
        return out  # type: ignore[return-value]

    @dispatch(SPLIT)
    def continuation_logprobs(self, items: list[tuple[str, str]], batch_size: int = 8) -> list[tuple[float, int]]:
        """For each (prompt, continuation): the summed log-probability of the continuation
        after the rendered prompt, and its token count."""
        out: list[tuple[float, int]] = []
        pad = self.tok.pad_token_id
        for chunk, idle in self.lockstep_batches(items, batch_size, idle_item=("", "x")):
            seqs, starts = [], []
            for prompt, cont in chunk:
                p_ids = self.tok(self.render(prompt), add_special_tokens=False)["input_ids"]
                seqs.append(p_ids + (self.tok(cont, add_special_tokens=False)["input_ids"] or [pad]))
                starts.append(len(p_ids))
            spans = self._span_logprobs(seqs, starts)
            if not idle:
                out += [(float(sum(x)), len(x)) for x in spans]
        return out

    @dispatch(SPLIT, out="logprobs")
    def token_logprobs(self, samples: list[dict], temperature: float = 1.0, batch_size: int = 8) -> list[list[float]]:
        """log p(response token) under this (frozen) model, logits divided by the sampling
        temperature: the reference role of PPO."""
        out: list[list[float]] = []
        for chunk, idle in self.lockstep_batches(samples, batch_size):
            seqs = [list(s["prompt_ids"]) + list(s["response_ids"]) for s in chunk]
            spans = self._span_logprobs(seqs, [len(s["prompt_ids"]) for s in chunk], temperature)
            if not idle:
                out += spans
        return out

    @dispatch(SPLIT)
    def generate(self, items: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0, batch_size: int = 8, ended: bool = False) -> list:
        """Continue each rendered prompt (rationales for chain-of-thought labeling).
        ``ended``: each as ``{"response", "ended"}``, ended saying whether it stopped before
        max_new_tokens (the rollout engines' signature)."""
        out: list = []
        torch.manual_seed(seed + self.rank)
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id,
                                  eos_token_id=self.tok.eos_token_id)
        kw.update(do_sample=True, temperature=temperature, top_p=1.0) if temperature > 0 else kw.update(do_sample=False)
        if self.lockstep:
            kw["synced_gpus"] = True  # ranks keep gathering until all have finished
        for chunk, idle in self.lockstep_batches(items, batch_size, idle_item=""):
            enc = self.tok([self.render(t) for t in chunk], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(self.device)
            with torch.no_grad():
                gen = self.model.generate(**enc, **kw)
            if not idle:
                new = gen[:, enc["input_ids"].shape[1]:]
                texts = self.tok.batch_decode(new, skip_special_tokens=True)
                if ended:  # a row that stopped early is padded after its EOS
                    texts = [{"response": t, "ended": bool((row == self.tok.eos_token_id).any())}
                             for t, row in zip(texts, new)]
                out.extend(texts)
        return out
