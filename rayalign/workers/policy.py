"""The policy role: a causal LM that trains (SFT now, PPO later) and generates."""
from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..algos.lm import shifted_nll_sum
from ..cluster import engine as eng
from ..cluster.worker import ALL, EACH, SPLIT, Worker, dispatch, live_tensor_bytes
from ..config import ModelConfig, TrainConfig, ZeroConfig
from ..data import collate


class PolicyWorker(Worker):
    engine = None
    tok = None

    # ------------------------------------------------------------ set-up

    @dispatch(ALL)
    def init_model(self, model: dict, zero: dict, train: dict, total_steps: int,
                   resume_from: str | None = None) -> dict[str, Any]:
        """Resolve the model on this rank's node, load its weights (the checkpoint's when
        resuming) and build the engine."""
        from ..models import load_tokenizer, resolve

        t0 = time.time()
        self.model_cfg = ModelConfig.model_validate(model)
        model_dir = resolve(self.model_cfg.name, self.model_cfg.seed, self.model_cfg.overrides,
                            say=lambda s: None)
        self.zero = ZeroConfig.model_validate(zero)
        self.train_cfg = TrainConfig.model_validate(train)
        torch.manual_seed(self.train_cfg.seed + self.rank)
        self.tok = load_tokenizer(model_dir)
        src = Path(resume_from) / "model" if resume_from else Path(model_dir)
        module = self._load_module(src)
        if self.model_cfg.gradient_checkpointing:
            module.gradient_checkpointing_enable()
        module.config.use_cache = False
        self.engine = eng.build_engine(module, self.zero, self.train_cfg, self.world_size,
                                       total_steps, self.model_cfg.dtype)
        self.engine.train()  # dropout decisions stay with the model config
        step = 0
        if resume_from:
            from safetensors.torch import load_file

            from ..checkpoint import read_state

            state = read_state(resume_from)
            step = int(state["optimizer_step"])
            eng.load_moments(self.engine, load_file(str(Path(resume_from) / "optimizer.safetensors")), step)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(step):
                    self.engine.lr_scheduler.step()
            self.engine.global_steps = step
        return {"load_s": time.time() - t0, "step": step,
                "params": sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())}

    def _load_module(self, path: Path):
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, self.model_cfg.dtype)
        if self.zero.stage == 3:
            # Build under zero.Init so no rank ever holds the full model; the HF
            # DeepSpeed config must stay alive while building (see DESIGN.md).
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            from transformers import AutoConfig

            hidden = eng.hidden_size_of(AutoConfig.from_pretrained(str(path), local_files_only=True))
            cfg = eng.ds_config(self.zero, self.train_cfg.micro_batch_size, 1, self.world_size,
                                self.train_cfg.grad_clip, self.model_cfg.dtype,
                                self.device.type == "cuda", hidden)
            hf_ds = HfDeepSpeedConfig(cfg)  # transformers holds it by weakref: zero.Init is on while it lives
            module = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
            # Off again, or rank 0's later from_config (export) would start a collective alone.
            del hf_ds, deepspeed
        else:
            module = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        return module.to(self.device) if self.device.type == "cuda" else module

    # ------------------------------------------------------------ SFT

    def _micro_batches(self, examples: list[dict]):
        mb = self.train_cfg.micro_batch_size
        for i in range(0, len(examples), mb):
            batch = collate(examples[i:i + mb], self.tok.pad_token_id)
            yield {k: v.to(self.device) for k, v in batch.items()}

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

    @contextlib.contextmanager
    def _full_params(self):
        if self.zero.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
                yield
        else:
            yield

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

    # ------------------------------------------------------------ state

    @dispatch(ALL)
    def save_checkpoint(self, root: str, step: int, trainer_state: dict, keep: int = 2) -> str | None:
        """Collective: every rank gathers; rank 0 writes. Returns the checkpoint path."""
        from safetensors.torch import save_file

        from .. import checkpoint

        weights, moments = eng.full_state(self.engine, with_optimizer=True)
        opt_step = eng.optimizer_step_count(self.engine)
        if self.rank != 0:
            return None

        def fill(tmp: Path) -> dict:
            self._write_hf(tmp / "model", weights)
            save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / "optimizer.safetensors"))
            return {"optimizer_step": opt_step, "world_size": self.world_size,
                    "zero_stage": self.zero.stage, "trainer": trainer_state}

        return str(checkpoint.write(root, step, fill, keep=keep))

    @dispatch(ALL)
    def export_hf(self, path: str) -> str | None:
        weights, _ = eng.full_state(self.engine, with_optimizer=False)
        if self.rank == 0:
            self._write_hf(Path(path), weights)
            return path
        return None

    def _write_hf(self, out: Path, weights: dict[str, torch.Tensor]) -> None:
        from transformers import AutoModelForCausalLM

        config = self.engine.module.config
        config.use_cache = True
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(weights, strict=False)
        tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and "lm_head" in k}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"export mismatch: missing={missing} unexpected={unexpected}")
        fresh.tie_weights()
        fresh.to(getattr(torch, self.model_cfg.dtype)).save_pretrained(out, safe_serialization=True)
        gen = getattr(self.engine.module, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(out)
        self.tok.padding_side = "right"
        self.tok.save_pretrained(out)
        config.use_cache = False

    @dispatch(EACH)
    def memory(self) -> dict[str, int]:
        """Per-rank bytes: the engine's own tensors and every live tensor in the process."""
        rep = eng.memory_report(self.engine)
        rep["live_tensors"] = live_tensor_bytes()
        return rep
