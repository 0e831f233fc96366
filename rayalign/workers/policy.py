"""The policy role: a causal LM that trains (SFT now, PPO later) and generates."""
from __future__ import annotations

import time

import torch

from ..algos.lm import shifted_nll_sum
from ..cluster.worker import SPLIT, dispatch, live_tensor_bytes
from .trainable import TrainableWorker


class PolicyWorker(TrainableWorker):
    # ------------------------------------------------------------ SFT

    @dispatch(SPLIT)
    def train_step(self, examples: list[dict], global_tokens: int,
                   measure_memory: bool = False) -> dict[str, list]:
        """One optimizer step on this rank's share of the global batch.

        The loss is the token mean over the *global* batch: each micro-batch's summed NLL
        is divided by the global token count and rescaled for DeepSpeed's averaging over
        ranks and accumulation steps, so any world size computes the same gradient.
        """
        t0 = time.time()
        ga = self.engine.gradient_accumulation_steps()
        n_micro = -(-len(examples) // self.train_cfg.micro_batch_size)
        if n_micro != ga:
            raise ValueError(f"rank {self.rank}: {len(examples)} examples make {n_micro} micro-batches, "
                             f"engine expects {ga}")
        nll_total, tokens = 0.0, 0
        scale = self.world_size * ga / max(1, global_tokens)
        held = 0
        for i, batch in enumerate(self._micro_batches(examples)):
            out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            nll, n = shifted_nll_sum(out.logits, batch["labels"])
            self.engine.backward(nll * scale)
            if measure_memory and i == n_micro - 1:
                # Parameters, gradients and optimizer state are all alive here, just
                # before the optimizer consumes the gradients: the training peak.
                del out
                held = live_tensor_bytes()
            self.engine.step()
            nll_total += float(nll.detach())
            tokens += n
        lr = self.engine.get_lr()[0]
        return {"nll_sum": [nll_total], "tokens": [tokens], "lr": [lr],
                "grad_norm": [float(self.engine.get_global_grad_norm() or 0.0)],
                "time_s": [time.time() - t0], "held_bytes": [held]}

    @dispatch(SPLIT)
    def eval_nll(self, examples: list[dict]) -> dict[str, list]:
        nll_total, tokens = 0.0, 0
        self.engine.eval()
        with torch.no_grad():
            for batch in self._micro_batches(examples):
                out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                nll, n = shifted_nll_sum(out.logits, batch["labels"])
                nll_total += float(nll)
                tokens += n
        self.engine.train()
        return {"nll_sum": [nll_total], "tokens": [tokens]}

    # ------------------------------------------------------------ generation

    @dispatch(SPLIT)
    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0) -> list[str]:
        """Chat-templated generation; greedy when temperature is 0."""
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
        module.config.use_cache = True
        with torch.no_grad(), self._full_params():
            out = module.generate(**enc, **kw)
        module.config.use_cache = False
        module.train()
        return self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

