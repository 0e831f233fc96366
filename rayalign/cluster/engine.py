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
                  stage3_max_live_parameters=zero.max_live_parameters,
                  stage3_max_reuse_distance=zero.max_live_parameters,
                  stage3_gather_16bit_weights_on_model_save=True,
                  # The optimizer steps one sub-group of the flat partition at a time; Adam's
                  # temporaries (a full-size copy or two) then scale with the sub-group, not the
                  # partition. DeepSpeed's 1e9 makes them the whole partition below 1B per rank.
                  sub_group_size=int(1e8))
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
        # Offloading the optimizer to the CPU when the model already lives there (a CPU run)
        # leaves both partitions on the same device: share them too. NVMe swapping moves
        # the master out of memory, so never.
        if getattr(opt, "params_in_nvme_swapper", None) or getattr(opt, "optimizer_swapper", None):
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


def _stage3(p) -> bool:
    return hasattr(p, "ds_id")


def _rank_of(p) -> int:
    import deepspeed.comm as dist

    return dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else 0


def owned_range(p, rank: int) -> tuple[int, int]:
    """(start, numel) of the elements of the flattened parameter whose fp32 master and Adam
    moments this rank holds under the engine's partitioning (ZeRO-3: its partition of the
    parameter; ZeRO-1/2 and the bf16 optimizer: its fragment of the flat buffer, possibly
    empty; no partitioning: everything, owned by rank 0)."""
    if _stage3(p):
        part = p.ds_tensor.numel()
        start = _rank_of(p) * part
        return start, max(0, min(part, p.ds_numel - start))
    if hasattr(p, "_hp_mapping"):
        m = p._hp_mapping
        return (0, 0) if m is None else (m.lp_fragment_address.start, m.lp_fragment_address.numel)
    return 0, (p.numel() if rank == 0 else 0)


def _fragment(engine, p, numel: int, key: str | None):
    """This rank's 1-D fp32 view of a parameter's master weights (``key`` None) or of one Adam
    moment; None if the optimizer has not made that state yet (before its first step)."""
    if _stage3(p):
        opt = engine.optimizer
        if key is not None:
            group, _, _ = opt.grad_position[opt.get_param_id(p)]
            if key not in opt.optimizer.state.get(opt.fp32_partitioned_groups_flat[group], {}):
                return None
        return opt.get_local_fp32_param(p, key).narrow(0, 0, numel)
    if hasattr(p, "_hp_mapping"):
        m = p._hp_mapping
        if key is None:
            return m.hp_fragment.view(-1)
        frags = m.optim_fragment or {}
        return frags[key].view(-1) if key in frags else None
    if key is None:
        return p.data.view(-1)
    st = _base_optimizer(engine).state.get(p, {})
    return st[key].view(-1) if key in st else None


def owned_fragments(engine, rank: int) -> list[tuple[str, tuple, int, dict]]:
    """What this rank writes to a checkpoint: (name, full shape, start, {kind: 1-D fp32
    tensor}) for every parameter range it owns. Views into the engine's own state, no copies."""
    out = []
    for name, p in _named_trainables(engine):
        start, numel = owned_range(p, rank)
        if numel == 0:
            continue
        shape = tuple(p.ds_shape) if _stage3(p) else tuple(p.shape)
        parts = {"weight": _fragment(engine, p, numel, None).float()}
        for key in ("exp_avg", "exp_avg_sq"):
            t = _fragment(engine, p, numel, key)
            if t is not None:
                parts[key] = t
        out.append((name, shape, start, parts))
    return out


@torch.no_grad()
def load_weights(module, shards, rank: int) -> None:
    """Fill a freshly built module (before the engine wraps it) with checkpointed weights:
    under ZeRO-3 only this rank's partition of each parameter is read, otherwise the whole
    parameter (every rank holds it anyway). Frozen parameters (a LoRA base) are not in
    checkpoints: they stay as the starting model loaded them."""
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if _stage3(p):
            start, numel = owned_range(p, rank)
            if numel:
                p.ds_tensor.data.view(-1)[:numel].copy_(shards.read("weight", name, start, start + numel))
        else:
            p.data.copy_(shards.read("weight", name).view_as(p))


def optimizer_step_count(engine) -> int:
    for st in _base_optimizer(engine).state.values():
        if "step" in st:
            s = st["step"]
            return int(s.item() if torch.is_tensor(s) else s)
    return 0


@torch.no_grad()
def load_state(engine, shards, rank: int, step: int) -> None:
    """After the engine is built: the fp32 master weights (exact, whatever the training
    dtype) and the Adam moments of the ranges this rank owns under the new partitioning."""
    if step > 0:
        _make_moment_slots(engine)
    for name, p in _named_trainables(engine):
        start, numel = owned_range(p, rank)
        if not _stage3(p) and not hasattr(p, "_hp_mapping"):
            start, numel = 0, p.numel()  # unpartitioned: every rank's optimizer holds it all
        if numel == 0:
            continue
        for key in (None, "exp_avg", "exp_avg_sq") if step > 0 else (None,):
            value = shards.read(key or "weight", name, start, start + numel)
            if _stage3(p):
                full = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32)
                full[:numel] = value
                engine.optimizer.set_local_hp_param(full, p, key)
            else:
                dst = _fragment(engine, p, numel, key)
                if dst is None:
                    raise KeyError(f"optimizer state {key} of {name} was not created")
                dst.copy_(value.to(device=dst.device, dtype=dst.dtype))
    if step > 0:
        base = _base_optimizer(engine)
        for st in base.state.values():
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st.get("step")) else step


def _make_moment_slots(engine) -> None:
    """Adam creates its state lazily at the first step; make the slots a resume fills in."""
    base = _base_optimizer(engine)
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
        # step(); link it now, over the slots just made, so the moments can be set.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


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
