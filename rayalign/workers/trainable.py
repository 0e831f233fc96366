"""The base of every role that trains: a Hugging Face model inside a DeepSpeed engine.

Loading (under ``zero.Init`` for ZeRO-3), resuming, checkpoints, HF export and memory
reports live here once; a role adds its model class and its loss.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..cluster import engine as eng
from ..cluster.worker import ALL, EACH, Worker, dispatch, live_tensor_bytes
from ..config import ModelConfig, TrainConfig, ZeroConfig


class TrainableWorker(Worker):
    engine = None
    tok = None
    lora_task = "CAUSAL_LM"  # PEFT's task type for this role's model (train.lora)

    def auto_class(self):
        """The transformers Auto class this role's model is built with."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def prepare_module(self, module):
        """A role's last touches on the freshly loaded model (before the engine wraps it)."""
        return module

    # ------------------------------------------------------------ set-up

    @dispatch(ALL)
    def init_model(self, model: dict, zero: dict, train: dict, total_steps: int,
                   resume_from: str | None = None) -> dict[str, Any]:
        """Resolve the model on this rank's node, load its weights (the checkpoint's when
        resuming) and build the engine."""
        from ..models import choose_dtype, load_tokenizer, resolve

        t0 = time.time()
        self.model_cfg = ModelConfig.model_validate(model)
        self.model_cfg.dtype, _ = choose_dtype(self.model_cfg.dtype, trains=True, device=self.device.type)
        model_dir = resolve(self.model_cfg.name, self.model_cfg.seed, self.model_cfg.overrides,
                            say=lambda s: None)
        self.zero = ZeroConfig.model_validate(zero)
        self.train_cfg = TrainConfig.model_validate(train)
        torch.manual_seed(self.train_cfg.seed + self.rank)
        self.tok = load_tokenizer(model_dir)
        module = self.prepare_module(self._load_module(Path(model_dir)))
        if self.train_cfg.lora is not None:
            from .. import lora

            module = lora.apply(module, self.train_cfg.lora, self.lora_task, self.train_cfg.seed)
            if self.model_cfg.gradient_checkpointing:
                module.enable_input_require_grads()  # frozen embeddings: checkpointed layers need a grad input
        shards, step = None, 0
        if resume_from:
            from .. import checkpoint

            step = int(checkpoint.read_state(resume_from)["optimizer_step"])
            shards = checkpoint.Shards(resume_from)
            eng.load_weights(module, shards, self.rank)
        if self.model_cfg.gradient_checkpointing:
            module.gradient_checkpointing_enable()
        module.config.use_cache = False
        self.engine = eng.build_engine(module, self.zero, self.train_cfg, self.world_size,
                                       total_steps, self.model_cfg.dtype)
        self.engine.train()  # dropout decisions stay with the model config
        self.lockstep = self.zero.stage == 3 and self.world_size > 1
        self.packing = self.model_cfg.packing and self._packing_works(module)
        self.resume_read: dict[str, Any] = {}
        if shards is not None:
            eng.load_state(self.engine, shards, self.rank, step)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(step):
                    self.engine.lr_scheduler.step()
            self.engine.global_steps = step
            self.resume_read = {"files": sorted(shards.files_read), "bytes": shards.bytes_read}
            shards.close()
            with checkpoint.local_copy(checkpoint.join(resume_from, "files")) as files:
                self.after_load(files)
        else:
            self.after_load(Path(model_dir))
        return {"load_s": time.time() - t0, "step": step, "resume_read": self.resume_read, "packing": self.packing,
                "params": sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())}

    def after_load(self, src: Path) -> None:
        """Role-specific files read beside the loaded model."""

    def per_token(self, tokens) -> torch.Tensor:
        """The model's per-position output [R, W, ...] for laid-out tokens (a role whose head
        pools, like the reward model's, reads it before the pooling)."""
        return self.engine(**tokens.inputs(self.device)).logits

    def _packing_works(self, module) -> bool:
        self.engine.eval()
        try:
            vocab = min(int(getattr(module.config, "vocab_size", 0) or len(self.tok)), len(self.tok))
            return self.check_packing(self.per_token, vocab)
        finally:
            self.engine.train()

    @dispatch(ALL)
    def attach_files(self, files: dict[str, str]) -> bool:
        """Text files written into every HF directory this rank exports or checkpoints
        (an Aligner's template record travels with its weights this way)."""
        self.export_files = dict(files)
        return True

    def load_kwargs(self) -> dict[str, Any]:
        return {}

    def _load_module(self, path: Path):
        auto = self.auto_class()
        dtype = getattr(torch, self.model_cfg.dtype)
        if self.zero.stage == 3:
            # Build under zero.Init so no rank ever holds the full model; the HF
            # DeepSpeed config must stay alive while building (without it a tiny GPT-2 built under
            # zero.Init started at loss ~40 instead of ~5.5).
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            from transformers import AutoConfig

            hidden = eng.hidden_size_of(AutoConfig.from_pretrained(str(path), local_files_only=True))
            cfg = eng.ds_config(self.zero, self.train_cfg.micro_batch_size, 1, self.world_size,
                                self.train_cfg.grad_clip, self.model_cfg.dtype,
                                self.device.type == "cuda", hidden)
            hf_ds = HfDeepSpeedConfig(cfg)  # transformers holds it by weakref: zero.Init is on while it lives
            module = auto.from_pretrained(str(path), dtype=dtype, local_files_only=True, **self.load_kwargs())
            # Off again, or rank 0's later from_config (export) would start a collective alone.
            del hf_ds, deepspeed
        else:
            module = auto.from_pretrained(str(path), dtype=dtype, local_files_only=True, **self.load_kwargs())
        return module.to(self.device) if self.device.type == "cuda" else module

    def lm_nll(self, examples: list[dict]) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL of SFT examples (``input_ids``, ``labels``) and the number of
        scored tokens, in this rank's layout (packed or padded)."""
        from ..algos.lm import layout_labeled, shifted_nll_sum

        t, labels = layout_labeled(examples, self.tok.pad_token_id, self.packing)
        return shifted_nll_sum(self.per_token(t), labels.to(self.device))

    def accumulate(self, items: list, global_count: int, loss_of: Callable[[list], tuple[torch.Tensor, dict]],
                   at_peak: Callable[[], None] | None = None) -> dict[str, list]:
        """One optimizer step over this rank's share of a global batch, in micro-batches.

        ``loss_of(chunk)`` returns the chunk's *summed* loss and numbers to add up. The sum
        is divided by ``global_count`` (tokens, pairs: whatever the loss averages over, for
        the whole global batch) and rescaled for DeepSpeed's averaging over ranks and
        accumulation steps, so any world size computes the same gradient. ``at_peak`` runs
        after the last backward, before the optimizer step, when parameters, gradients and
        optimizer state are all alive.
        """
        t0 = time.time()
        if at_peak is None and getattr(self, "_track_memory", False):
            at_peak = self._note_held
        ga = self.engine.gradient_accumulation_steps()
        mb = self.train_cfg.micro_batch_size
        n_micro = -(-len(items) // mb)
        if n_micro != ga:
            raise ValueError(f"rank {self.rank}: {len(items)} items make {n_micro} micro-batches of {mb}, "
                             f"the engine expects {ga}")
        scale = self.world_size * ga / max(1, global_count)
        sums: dict[str, float] = {}
        for i in range(n_micro):
            loss, stats = loss_of(items[i * mb:(i + 1) * mb])
            self.engine.backward(loss * scale)
            if at_peak is not None and i == n_micro - 1:
                at_peak()
            self.engine.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v
        return {k: [v] for k, v in sums.items()} | {
            "lr": [self.engine.get_lr()[0]], "time_s": [time.time() - t0],
            "grad_norm": [float(self.engine.get_global_grad_norm() or 0.0)]}

    # ------------------------------------------------------------ state

    @dispatch(ALL)
    def save_checkpoint(self, root: str, step: int, trainer_state: dict, keep: int = 2) -> str | None:
        """Collective: each rank writes only the state it owns (its shard); rank 0 marks the
        checkpoint complete once all have. Returns the checkpoint's path or URI."""
        from .. import checkpoint

        if self.rank == 0:
            checkpoint.begin(root, step)
        self._barrier()
        d = checkpoint.step_dir(root, step)
        checkpoint.write_shard(d, self.rank, self.world_size, eng.owned_fragments(self.engine, self.rank))
        opt_step = eng.optimizer_step_count(self.engine)
        self._barrier()  # every shard is written before the checkpoint is marked complete
        if self.rank != 0:
            return None
        with checkpoint.local_dir(checkpoint.join(d, "files")) as files:
            self._write_side_files(files)
        return checkpoint.finish(root, step, {"optimizer_step": opt_step, "world_size": self.world_size,
                                              "zero_stage": self.zero.stage, "trainer": trainer_state}, keep)

    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    @dispatch(ALL)
    def sync_weights(self, targets: list, version: int, bucket_mb: float = 64.0,
                     timeout_s: float = 300.0) -> dict[str, Any]:
        """Send the current weights to rollout engines (``targets``: their Ray actors, or
        in-process :class:`RolloutWorker` objects) as weight ``version``.

        Collective: under ZeRO-3 every rank gathers each parameter in turn (one at a time,
        never the whole model); rank 0 alone groups them into buckets of whole layers,
        puts each bucket once into the object store (shared memory on a node) and every
        engine loads it while the next is gathered. The engines commit the version only
        if the content hash of what they received equals rank 0's. Past ``timeout_s``
        the sync fails with :class:`~rayalign.rollout.SyncError`."""
        from ..rollout import SyncError, buckets, combine_digests, tensor_digest

        t0 = time.time()
        deadline = t0 + timeout_s
        remote = bool(targets) and hasattr(getattr(targets[0], "load_bucket", None), "remote")

        def call(method: str, *args):
            return [getattr(t, method).remote(*args) if remote else getattr(t, method)(*args) for t in targets]

        def wait(refs: list, what: str) -> list:
            if not remote:
                return refs
            import ray

            try:
                return ray.get(refs, timeout=max(0.1, deadline - time.time()))
            except ray.exceptions.GetTimeoutError:
                raise SyncError(f"weight sync to version {version}: the rollout engines did not finish {what} "
                                f"within rollout.sync_timeout_s={timeout_s:g}s; an engine is stuck or overloaded "
                                "(check its log, raise the timeout for larger models)") from None
            except ray.exceptions.RayActorError as e:
                raise SyncError(f"weight sync to version {version}: a rollout engine died during {what}: "
                                f"{str(e).splitlines()[0]}") from None

        if self.rank != 0:
            if self.zero.stage == 3:
                for _ in self._hf_params():  # take part in every gather; rank 0 sends
                    pass
            return {}
        wait(call("begin_sync", version), "begin_sync")
        digests: dict[str, str] = {}
        sent, n_buckets, in_flight = 0, 0, None
        for bucket in buckets(self._hf_params(), int(bucket_mb * 2**20)):
            for n, t in bucket:
                digests[n] = tensor_digest(n, t)
                sent += t.numel() * t.element_size()
            if in_flight is not None:
                wait(in_flight, f"bucket {n_buckets}")
            if remote:
                import ray

                ref = ray.put(bucket)
                in_flight = call("load_bucket", ref)
            else:
                in_flight = call("load_bucket", bucket)
            n_buckets += 1
        if in_flight is not None:
            wait(in_flight, f"bucket {n_buckets}")
        wait(call("end_sync", version, combine_digests(digests), len(digests)), "end_sync")
        return {"sync_s": time.time() - t0, "sync_bytes": sent, "sync_buckets": n_buckets,
                "digest": combine_digests(digests), "params": len(digests)}

    def _hf_params(self):
        """(name, full tensor) of the model as it leaves this role (export, rollout engines):
        the parameters themselves, or with LoRA the merged weights under the base model's names."""
        if self.train_cfg.lora is None:
            return self._full_params()
        from .. import lora

        return lora.merged(self._full_params(), self.train_cfg.lora)

    def _hf_specs(self, dtype) -> list[tuple[str, Any, tuple]]:
        """(name, dtype, shape) of what :meth:`_hf_params` yields, in its order."""
        metas = ((n, torch.empty(tuple(getattr(p, "ds_shape", None) or p.shape), device="meta"))
                 for n, p in self.engine.module.named_parameters())
        if self.train_cfg.lora is not None:
            from .. import lora

            metas = lora.merged(metas, self.train_cfg.lora)
        return [(n, dtype, tuple(t.shape)) for n, t in metas]

    def _full_params(self):
        """(name, full tensor on the CPU) for each parameter in turn; under ZeRO-3 a
        collective gather of that one parameter (other ranks get None)."""
        stage3 = self.zero.stage == 3
        for name, p in self.engine.module.named_parameters():
            if stage3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    yield name, (p.data.detach().cpu().clone() if self.rank == 0 else None)
            else:
                yield name, p.data.detach().cpu()

    @dispatch(ALL)
    def weights_digest(self) -> str | None:
        """Content hash of every parameter as the engines receive them (collective)."""
        from ..rollout import combine_digests, tensor_digest

        out = {n: tensor_digest(n, t) for n, t in self._hf_params() if t is not None}
        return combine_digests(out) if self.rank == 0 else None

    @dispatch(ALL)
    def export_hf(self, path: str, max_shard_mb: float = 2048) -> str | None:
        """A Hugging Face model directory, streamed: parameters are gathered one at a time
        (collective under ZeRO-3) and rank 0 writes each into safetensors shards of at most
        ``max_shard_mb`` as it arrives; no rank ever holds the whole model."""
        from .. import checkpoint

        dtype = getattr(torch, self.model_cfg.dtype)
        specs = self._hf_specs(dtype)
        params = self._hf_params()
        if self.rank != 0:
            for _ in params:  # take part in every gather; rank 0 writes
                pass
            return None
        checkpoint.remove(path)
        checkpoint.makedirs(path)
        size = lambda spec: checkpoint.nbytes(spec[1], spec[2])  # noqa: E731
        chunks = list(checkpoint.iter_chunks(specs, int(max_shard_mb * 2**20), size))
        weight_map = {}
        for i, chunk in enumerate(chunks):
            fname = "model.safetensors" if len(chunks) == 1 else f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
            checkpoint.write_safetensors(checkpoint.join(path, fname), chunk,
                                         (next(params)[1] for _ in chunk), {"format": "pt"})
            weight_map.update({n: fname for n, _, _ in chunk})
        if len(chunks) > 1:
            index = {"metadata": {"total_size": sum(map(size, specs))}, "weight_map": weight_map}
            checkpoint.write_text(checkpoint.join(path, "model.safetensors.index.json"), json.dumps(index, indent=1))
        with checkpoint.local_dir(path) as out:
            config = self._base_module().config
            config.use_cache = True
            config.save_pretrained(out)
            config.use_cache = False
            gen = getattr(self._base_module(), "generation_config", None)
            if gen is not None:
                gen.save_pretrained(out)
            self.tok.padding_side = "right"
            self.tok.save_pretrained(out)
            self._write_side_files(out)
        return path

    def _base_module(self):
        """The transformers model inside the engine (inside PEFT's wrapper with LoRA)."""
        m = self.engine.module
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _write_side_files(self, out: Path) -> None:
        for name, text in getattr(self, "export_files", {}).items():
            (out / name).write_text(text)
        self.after_export(out)

    def after_export(self, out: Path) -> None:
        """Role-specific files beside the exported model."""

    @dispatch(ALL)
    def track_memory(self, on: bool = True) -> None:
        """While on, every optimizer step (SFT, PPO, RM alike) notes the tensor bytes alive
        after its last backward; ``memory()`` reports the largest as ``held_at_step``."""
        self._track_memory = on
        self._held_at_step = 0

    def _note_held(self) -> None:
        self._held_at_step = max(getattr(self, "_held_at_step", 0), live_tensor_bytes())

    @dispatch(EACH)
    def memory(self) -> dict[str, int]:
        """Per-rank bytes: the engine's own tensors, every live tensor in the process, and
        (with ``track_memory``) the most alive at an optimizer step."""
        rep = eng.memory_report(self.engine)
        rep["live_tensors"] = live_tensor_bytes()
        rep["held_at_step"] = getattr(self, "_held_at_step", 0)
        return rep

