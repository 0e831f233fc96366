"""The policy role: a causal LM that trains (SFT, PPO and its family, DPO/IPO) and generates."""
from __future__ import annotations

import contextlib

import torch

from ..algos import ppo, preference
from ..algos.lm import response_slices, response_sums, sample_layout, sequence_logprobs, to_frame
from ..cluster.worker import SPLIT, SavedActivations, dispatch, live_tensor_bytes
from .trainable import TrainableWorker


class PolicyWorker(TrainableWorker):
    # ------------------------------------------------------------ SFT

    @dispatch(SPLIT)
    def train_step(self, examples: list[dict], global_tokens: int,
                   measure_memory: bool = False) -> dict[str, list]:
        """One SFT optimizer step; the loss is the token mean over the *global* batch.

        ``measure_memory``: this rank's tensor bytes after the last backward (parameters,
        gradients, optimizer state), the bytes autograd saved for one micro-batch, and the
        ZeRO-3 parameters gathered during its forward (what ``rayalign plan`` estimates)."""
        held = [0]
        acts: list[SavedActivations] = []

        def loss_of(chunk):
            ctx = SavedActivations(self.engine.module) if measure_memory else contextlib.nullcontext()
            with ctx:
                nll, n = self.lm_nll(chunk)
            if measure_memory:
                acts[:] = [ctx]
            return nll, {"nll_sum": float(nll.detach()), "tokens": n}

        def measure():
            held[0] = live_tensor_bytes()

        r = self.accumulate(examples, global_tokens, loss_of, measure if measure_memory else None)
        return r | {"held_bytes": [held[0]], "activation_bytes": [acts[0].bytes if acts else 0],
                    "gathered_bytes": [acts[0].gathered if acts else 0]}

    @dispatch(SPLIT)
    def eval_nll(self, examples: list[dict]) -> dict[str, list]:
        nll_total, tokens = 0.0, 0
        self.engine.eval()
        mb = self.train_cfg.micro_batch_size
        with torch.no_grad():
            for i in range(0, len(examples), mb):
                nll, n = self.lm_nll(examples[i:i + mb])
                nll_total += float(nll)
                tokens += n
        self.engine.train()
        return {"nll_sum": [nll_total], "tokens": [tokens]}

    # ------------------------------------------------------------ generation

    def _adapter(self, on: bool):
        """A context with this rank's LoRA adapter on (as it trains) or off (the base model:
        PPO's reference when the policy trains LoRA)."""
        if on:
            return contextlib.nullcontext()
        if not hasattr(self.engine.module, "disable_adapter"):
            raise ValueError("adapter=False needs a policy that trains LoRA (train.lora)")
        return self.engine.module.disable_adapter()

    @dispatch(SPLIT)
    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, adapter: bool = True) -> list[str]:
        """Chat-templated generation; greedy when temperature is 0. ``adapter=False``: the
        base model under a LoRA adapter."""
        from ..data import chat_prompt

        module = self.engine.module
        module.eval()
        self.tok.padding_side = "left"
        texts = [chat_prompt(self.tok, p) for p in prompts]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id,
                  eos_token_id=self.tok.eos_token_id)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False)
        if self.lockstep:
            kw["synced_gpus"] = True  # ZeRO-3: see rollout()
        module.config.use_cache = True
        with torch.no_grad(), self._adapter(adapter):
            out = module.generate(**enc, **kw)
        module.config.use_cache = False
        module.train()
        return self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


    # ------------------------------------------------------------ PPO

    @dispatch(SPLIT, out="rows", takes="prompt")
    def rollout(self, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.7,
                top_p: float = 1.0, seed: int = 0, batch_size: int = 8, min_new_tokens: int = 0) -> list[dict]:
        """Sample one response per prompt (left-padded batches). Each response is cut after
        its first EOS; ``ended`` says whether it had one. ``min_new_tokens`` keeps EOS away
        that long (benchmarks use it for fixed-length responses)."""
        from ..data import chat_prompt
        from ..rollout import finish_sample, hf_sample

        module = self.engine.module
        module.eval()
        module.config.use_cache = True
        torch.manual_seed(seed * 1000 + self.rank)
        out: list[dict] = []
        # ZeRO-3 across ranks: layers are gathered by DeepSpeed's hooks as generation
        # reaches them, and synced_gpus keeps every rank stepping until all are done.
        # (Gathering the whole model around generate() trips over the hooks' prefetching.)
        with torch.no_grad():
            for chunk, idle in self.lockstep_batches(prompts, batch_size):
                ids = [self.tok(chat_prompt(self.tok, p), add_special_tokens=False)["input_ids"] for p in chunk]
                res = hf_sample(module, self.tok, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, min_new_tokens=min_new_tokens, device=self.device, sync=self.lockstep)
                if idle:
                    continue
                out += [finish_sample(p, resp, lps, self.tok.eos_token_id, self.tok.pad_token_id, self.tok)
                        for p, (resp, lps) in zip(ids, res)]
        module.config.use_cache = False
        module.train()
        return out

    def _forward(self, samples: list[dict]):
        """Logits of prompt+response sequences in this rank's layout, the layout, and the
        action mask (the shifted positions that score response tokens)."""
        t, act = sample_layout(samples, self.tok.pad_token_id, self.packing)
        return self.per_token(t), t, act.to(self.device)

    @dispatch(SPLIT, out="logprobs")
    def token_logprobs(self, samples: list[dict], temperature: float = 1.0, batch_size: int = 8,
                       adapter: bool = True) -> list[list[float]]:
        """log π(response token) with logits divided by the sampling temperature
        (``adapter=False``: under the base model, PPO's reference with a LoRA policy)."""
        out: list[list[float]] = []
        self.engine.eval()
        with torch.no_grad(), self._adapter(adapter):
            for chunk, idle in self.lockstep_batches(samples, batch_size):
                logits, t, _ = self._forward(chunk)
                if not idle:
                    out += response_slices(sequence_logprobs(logits, t.ids.to(self.device), temperature).cpu(),
                                           t, chunk)
        self.engine.train()
        return out

    @dispatch(SPLIT)
    def ppo_update(self, samples: list[dict], global_count: int, clip: float = 0.2,
                   temperature: float = 1.0, entropy_coef: float = 0.0, clip_high: float | None = None,
                   kl_coef: float = 0.0, kl_estimator: str = "k3", loss_agg: str = "token_mean",
                   norm_len: int | None = None) -> dict[str, list]:
        """One optimizer step of the clipped PPO objective on this rank's share of a
        minibatch. The per-token terms are summed with :func:`~rayalign.algos.ppo.aggregation_weights`
        and divided by ``global_count``, the whole minibatch's tokens (``token_mean``) or
        sequences (any world size computes the same gradient).

        ``kl_coef`` > 0: the KL to the reference as a loss term (GRPO): β·k(logπ, logπ_ref)
        per token, from each sample's ``ref_logprobs``, instead of a penalty in the reward.
        ``clip_high``: DAPO's asymmetric clip range (ε_high; ``clip`` is ε_low)."""
        def loss_of(chunk):
            logits, t, act = self._forward(chunk)
            dev = act.device
            logp = sequence_logprobs(logits, t.ids.to(self.device), temperature)
            scaled = logits[:, :-1].float() / temperature
            old = to_frame([s["old_logprobs"] for s in chunk], t, chunk).to(dev)
            adv = to_frame([s["advantages"] for s in chunk], t, chunk).to(dev)
            isw = to_frame([s["is_weights"] for s in chunk], t, chunk).to(dev) \
                if chunk[0].get("is_weights") is not None else None
            weights = None  # token_mean: every token weighs 1
            if loss_agg != "token_mean":
                lens = torch.tensor([len(s["response_ids"]) for s in chunk])
                w = ppo.aggregation_weights(lens, loss_agg, norm_len).tolist()
                weights = to_frame([[x] * n for x, n in zip(w, lens.tolist())], t, chunk).to(dev)
            term, st = ppo.policy_terms(logp, old, adv, act, clip, isw, clip_high)
            ent = ppo.entropy_from_logits(scaled if entropy_coef else scaled.detach())
            total = term
            kl_tok = None
            if kl_coef:
                ref = to_frame([s["ref_logprobs"] for s in chunk], t, chunk).to(dev)
                kl_tok = ppo.kl_estimate(logp, ref, kl_estimator) * act
                total = total + kl_coef * kl_tok
            if entropy_coef:
                total = total - entropy_coef * ent * act
            k = float(act.sum())
            out = {"loss": float(ppo.masked_sum(term.detach(), act)), "clipfrac": float(st["clipfrac"]) * k,
                   "approx_kl": float(st["approx_kl"]) * k, "entropy": float(ppo.masked_sum(ent.detach(), act)),
                   "tokens": int(k)}
            if kl_tok is not None:
                out["kl_loss"] = float(kl_tok.detach().sum())
            return (total if weights is None else total * weights).sum(), out

        # Dropout off: the ratio must compare the same function before and after.
        self.engine.eval()
        try:
            return self.accumulate(samples, global_count, loss_of)
        finally:
            self.engine.train()

    # ------------------------------------------------------------ DPO / IPO

    def _pair_logps(self, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """log π(y1|x) and log π(y2|x), summed over response tokens, of each pair (both
        responses of a micro-batch in one forward)."""
        samples = [{"prompt_ids": q["prompt_ids"], "response_ids": q[k]} for k in ("ids_1", "ids_2") for q in pairs]
        logits, t, _ = self._forward(samples)
        sums = response_sums(sequence_logprobs(logits, t.ids.to(self.device)), t, samples)
        return sums[:len(pairs)], sums[len(pairs):]

    def _pair_loss(self, pairs: list[dict], loss: str, beta: float, tau: float):
        """Per-pair losses, and sums over the pairs: loss, implicit rewards of the preferred
        and the other response, reward accuracy and margin over pairs with a decided label."""
        pi1, pi2 = self._pair_logps(pairs)
        dev = pi1.device
        ref1 = torch.tensor([q["ref_1"] for q in pairs], device=dev)
        ref2 = torch.tensor([q["ref_2"] for q in pairs], device=dev)
        p = torch.tensor([q["p"] for q in pairs], device=dev)
        per_pair = preference.preference_loss(loss, preference.dpo_margin(pi1, pi2, ref1, ref2), p, beta, tau)
        r1 = preference.implicit_reward(pi1.detach(), ref1, beta)
        r2 = preference.implicit_reward(pi2.detach(), ref2, beta)
        first = p >= 0.5
        chosen, rejected = torch.where(first, r1, r2), torch.where(first, r2, r1)
        decided = p != 0.5
        return per_pair, {"loss": float(per_pair.detach().sum()), "pairs": len(pairs),
                          "reward_chosen": float(chosen.sum()), "reward_rejected": float(rejected.sum()),
                          "correct": int(((chosen > rejected) & decided).sum()), "decided": int(decided.sum()),
                          "margin": float(((chosen - rejected) * decided).sum())}

    @dispatch(SPLIT)
    def dpo_update(self, pairs: list[dict], global_pairs: int, loss: str = "sigmoid", beta: float = 0.1,
                   tau: float = 0.1) -> dict[str, list]:
        """One optimizer step of DPO (``loss="sigmoid"``) or IPO on this rank's share of a
        batch of pairs, the loss a mean over the whole batch's ``global_pairs``. A pair holds
        ``prompt_ids``, ``ids_1``/``ids_2`` (the two responses), ``p`` = P(y1 > y2) and
        ``ref_1``/``ref_2``, the reference's summed log-probs of each response."""
        def loss_of(chunk):
            per_pair, stats = self._pair_loss(chunk, loss, beta, tau)
            return per_pair.sum(), stats

        # Dropout off: the log-probs are compared with the reference's, computed without it.
        self.engine.eval()
        try:
            return self.accumulate(pairs, global_pairs, loss_of)
        finally:
            self.engine.train()

    @dispatch(SPLIT)
    def dpo_eval(self, pairs: list[dict], loss: str = "sigmoid", beta: float = 0.1, tau: float = 0.1,
                 batch_size: int = 8) -> dict[str, list]:
        """The DPO statistics of held-out pairs, without a step (sums, as :meth:`dpo_update`)."""
        sums: dict[str, float] = {}
        self.engine.eval()
        with torch.no_grad():
            for chunk, idle in self.lockstep_batches(pairs, batch_size):
                _, stats = self._pair_loss(chunk, loss, beta, tau)
                if not idle:
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0) + v
        self.engine.train()
        return {k: [v] for k, v in sums.items()}
