"""DeepSpeed engines from a role's config, and world-size independent training state.

The whole of ZeRO lives here: a worker hands over its module, its ZeRO section and
its training section; the rest of the code base calls ``engine(...)``,
``engine.backward`` and ``engine.step`` and never asks which stage it runs.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..config import TrainConfig, ZeroConfig


def ds_config(zero: ZeroConfig, micro_batch: int, grad_accum: int, world_size: int,
              grad_clip: float, dtype: str, on_gpu: bool, hidden_size: int = 1024) -> dict[str, Any]:
    zo: dict[str, Any] = {"stage": zero.stage}
    # Communication buckets sized from the model, as transformers' "auto" values do:
    # DeepSpeed's fixed defaults (5e8 elements = 2 GB of fp32 buffers) would dwarf
    # a small model's own state and defeat the point of partitioning it.
    bucket = max(hidden_size * hidden_size, 2**16)
    if zero.stage >= 1:
        zo.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if zero.stage == 3:
        zo.update(stage3_prefetch_bucket_size=int(0.9 * bucket),
                  stage3_param_persistence_threshold=10 * hidden_size,
                  stage3_max_live_parameters=int(1e9), stage3_max_reuse_distance=int(1e9),
                  stage3_gather_16bit_weights_on_model_save=True)
    if zero.offload_optimizer:
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if zero.offload_params:
        zo["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zo,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # We hand DeepSpeed a torch optimizer; on CPU there is nothing faster to offload to.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "float16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return cfg


def lr_lambda(train: TrainConfig, total_steps: int):
    warm = train.warmup_steps
    total = max(1, total_steps)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if train.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if train.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to 10%

    return f


def hidden_size_of(model_or_config) -> int:
    cfg = getattr(model_or_config, "config", model_or_config)
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 1024


def build_engine(model: torch.nn.Module, zero: ZeroConfig, train: TrainConfig, world_size: int,
                 total_steps: int, dtype: str = "float32"):
    import deepspeed

    per_rank = train.batch_size // world_size
    grad_accum = per_rank // train.micro_batch_size
    on_gpu = torch.cuda.is_available()
    params = [p for p in model.parameters() if p.requires_grad]
    if zero.offload_optimizer and on_gpu:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=train.lr, betas=train.betas,
                                weight_decay=train.weight_decay, fused=on_gpu or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train, total_steps))
    cfg = ds_config(zero, train.micro_batch_size, grad_accum, world_size, train.grad_clip,
                    dtype, on_gpu, hidden_size_of(model))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=cfg)
    share_fp32_master(engine)
    return engine


def share_fp32_master(engine) -> int:
    """When the model itself trains in fp32, let ZeRO's fp32 master partition share storage
    with the model's own partition instead of holding a second copy of it.

    DeepSpeed clones the partition even when the dtypes and devices already match; the
    copy-back after each step then copies a tensor onto itself. Saves one partition of
    parameters per rank (a quarter of ZeRO-3's per-rank state). Returns elements shared.
    """
    opt = engine.optimizer
    pairs = []
    if hasattr(opt, "fp32_partitioned_groups_flat") and hasattr(opt, "fp16_partitioned_groups_flat"):
        if getattr(opt, "offload_optimizer", False) or getattr(opt, "params_in_nvme_swapper", None):
            return 0
        pairs = list(zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat))
    elif hasattr(opt, "single_partition_of_fp32_groups") and hasattr(opt, "parallel_partitioned_bit16_groups"):
        if getattr(opt, "cpu_offload", False):
            return 0
        import deepspeed.comm as dist

        for i, fp32 in enumerate(opt.single_partition_of_fp32_groups):
            pid = dist.get_rank(group=opt.real_dp_process_group[i])
            pairs.append((fp32, opt.parallel_partitioned_bit16_groups[i][pid]))
    shared = 0
    for master, model_part in pairs:
        if (master.dtype == model_part.dtype == torch.float32 and master.device == model_part.device
                and master.shape == model_part.shape and master.data_ptr() != model_part.data_ptr()
                and torch.equal(master, model_part)):
            master.data = model_part.data
            shared += master.numel()
    if shared and hasattr(opt, "_link_all_hp_params"):
        # ZeRO-1/2 keep per-parameter views into the fp32 partition (for safe_get_* and
        # checkpoints); rebuild them over the shared storage.
        opt._link_all_hp_params()
    return shared


# ---------------------------------------------------------------- state, any world size

def _named_trainables(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def full_state(engine, with_optimizer: bool = True) -> tuple[dict, dict]:
    """Full (unpartitioned) fp32 weights and Adam moments, keyed by parameter name.

    Collective under ZeRO: every rank must call it; every rank gets the result.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    stage = _zero_stage(engine)
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    for name, p in _named_trainables(engine):
        if stage == 0:
            weights[name] = p.detach().float().cpu().clone()
            st = engine.optimizer.state.get(p, {}) if with_optimizer else {}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    moments[f"{key}::{name}"] = st[key].detach().float().cpu().clone()
        else:
            weights[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            if with_optimizer:
                for key in ("exp_avg", "exp_avg_sq"):
                    v = safe_get_full_optimizer_state(p, key)
                    if v is not None:
                        moments[f"{key}::{name}"] = v.detach().float().cpu().clone()
    return weights, moments


def optimizer_step_count(engine) -> int:
    for st in _base_optimizer(engine).state.values():
        if "step" in st:
            s = st["step"]
            return int(s.item() if torch.is_tensor(s) else s)
    return 0


def load_moments(engine, moments: dict[str, torch.Tensor], step: int) -> None:
    """Put saved Adam moments (full tensors) back, partitioned for this engine's world."""
    from deepspeed.utils import safe_set_full_optimizer_state

    stage = _zero_stage(engine)
    base = _base_optimizer(engine)
    # Adam creates its state lazily at the first step; make the slots to fill in.
    # ZeRO-3 hands its flat fp32 partitions to the optimizer only during step().
    masters = list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])) or \
        [p for group in base.param_groups for p in group["params"]]
    for p in masters:
        st = base.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in st:
                st[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        st.setdefault("step", torch.tensor(0.0))
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter's view into the optimizer state only after the first
        # step(); link it now, over the slots just made, so the moments can be set by name.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for name, p in _named_trainables(engine):
        for key in ("exp_avg", "exp_avg_sq"):
            full = moments.get(f"{key}::{name}")
            if full is None:
                raise KeyError(f"checkpoint lacks {key} for {name}")
            if stage == 0:
                base.state[p][key].copy_(full.to(device=p.device, dtype=torch.float32).view_as(p))
            else:
                safe_set_full_optimizer_state(p, full.to(torch.float32), key)
    for st in base.state.values():
        st["step"] = torch.tensor(float(step)) if torch.is_tensor(st.get("step")) else step


def memory_report(engine) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state.

    Measured by walking the tensors the engine actually owns (ZeRO partitions,
    flat fp32 groups, gradient buffers, Adam moments), de-duplicated by storage.
    """
    seen: set[int] = set()

    def size(t) -> int:
        if t is None or not torch.is_tensor(t) or t.device.type == "meta":
            return 0
        st = t.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()

    def walk(obj, depth=0) -> int:
        if torch.is_tensor(obj):
            return size(obj)
        if depth > 3:
            return 0
        if isinstance(obj, dict):
            return sum(walk(v, depth + 1) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v, depth + 1) for v in obj)
        return 0

    params = 0
    for p in engine.module.parameters():
        params += size(getattr(p, "ds_tensor", None)) + size(p.data)
    grads = sum(size(p.grad) for p in engine.module.parameters())
    opt_bytes = 0
    base = _base_optimizer(engine)
    for st in base.state.values():
        opt_bytes += walk(st)
    for group in base.param_groups:
        for p in group["params"]:  # ZeRO's flat fp32 master partitions
            opt_bytes += size(p)
            grads += size(p.grad)
    zero_opt = engine.optimizer if engine.optimizer is not base else None
    if zero_opt is not None:
        for attr, val in vars(zero_opt).items():
            if "grad" in attr or "ipg" in attr or "bucket" in attr:
                grads += walk(val)
            elif "fp32" in attr or "partition" in attr or "flat" in attr:
                opt_bytes += walk(val)
    return {"params": params, "grads": grads, "optimizer": opt_bytes,
            "total": params + grads + opt_bytes}
