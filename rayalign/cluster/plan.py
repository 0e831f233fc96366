"""Preflight: per-rank memory of every role a config starts, and whether the layout fits
a cluster, before anything is launched.

The estimates count tensor bytes, the quantity ``torch.cuda.max_memory_allocated``
reports (and what the scaling benchmark measures on CPUs by walking live tensors and
the tensors autograd saves): model state by ZeRO stage and offload, activations saved
for backward at the configured lengths, logits, the KV cache of generation, and the
layers ZeRO-3 gathers while it computes. Runtime overhead outside tensors (CUDA context,
allocator slack, communication buffers) is ``reserve_gb`` per rank in the fit check.

Model state per rank, P parameters, W ranks of the role (DeepSpeed's layout):

=====  ==========  ===================================  ==================================
stage  parameters  gradients                            optimizer (Adam)
=====  ==========  ===================================  ==================================
0      b P         b P (+ 4 P fp32 for 16-bit)          8 P (+ 4 P fp32 master for 16-bit)
1      b P         4 P / W (+ b P / W for 16-bit)       (8 P + master) / W
2      b P         4 P / W (+ b P / W for 16-bit)       (8 P + master) / W
3      b P / W     4 P / W (+ b P / W for 16-bit)       (8 P + master) / W
=====  ==========  ===================================  ==================================

b is the bytes of the training dtype. In fp32 rayalign shares DeepSpeed's fp32 master
copy with the parameters (no master term). ZeRO-3 also holds the parameters it gathers
for the layers in flight: min(P, zero.max_live_parameters) x b during forward and backward
(DeepSpeed's default stage3_max_live_parameters, 1e9, unless the config lowers it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError, GroupConfig, ModelConfig, TrainConfig
from ..errors import RayalignError
from .placement import PlacementError, check_feasible, plan_pools

GB = 1024**3
LABELER_TOKENS = 512       # a judged prompt: template, question and two responses


class PlanError(RayalignError, ValueError):
    """A layout that cannot fit, phrased with the role, the rank and the numbers."""


# ---------------------------------------------------------------- models

@dataclass(frozen=True)
class Shape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    head: str  # "causal" | "score" | "value"

    @property
    def logits_width(self) -> int:
        return self.vocab if self.head == "causal" else 1


_SHAPES: dict[tuple, Shape] = {}


def model_shape(model: ModelConfig, head: str = "causal") -> Shape:
    """Parameter count (instantiated on the meta device: exact, no weights read) and the
    sizes the activation and cache estimates need."""
    key = (model.name, model.seed, tuple(sorted(model.overrides.items())), head)
    if key in _SHAPES:
        return _SHAPES[key]
    hf, m = _meta_model(model, head)
    params = sum(p.numel() for p in m.parameters())  # parameters() yields tied weights once
    h = int(getattr(hf, "hidden_size"))
    heads = int(getattr(hf, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(hf, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf, "head_dim", None) or h // heads)
    inter = getattr(hf, "intermediate_size", None) or getattr(hf, "n_inner", None) or 4 * h
    shape = Shape(params=params, layers=int(hf.num_hidden_layers), hidden=h, intermediate=int(inter),
                  kv_dim=kv_heads * head_dim, vocab=int(hf.vocab_size), head=head)
    _SHAPES[key] = shape
    return shape


def _meta_model(model: ModelConfig, head: str):
    """The model's HF config and the model built on the meta device (no weights read)."""
    import torch
    import transformers

    from ..models import resolve

    path = resolve(model.name, model.seed, model.overrides, say=lambda _m: None)
    hf = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    auto = {"causal": transformers.AutoModelForCausalLM,
            "score": transformers.AutoModelForSequenceClassification,
            "value": transformers.AutoModelForTokenClassification}[head]
    if head != "causal":
        hf.num_labels = 1
    with torch.device("meta"):
        try:
            m = auto.from_config(hf)
        except ValueError:  # an encoder has no causal-LM class: plan it as a scorer
            m = transformers.AutoModel.from_config(hf)
    return hf, m


def trainable_params(model: ModelConfig, head: str, train: TrainConfig | None) -> int:
    """Parameters the optimizer holds: all of them, or with LoRA the adapters and a new head."""
    P = model_shape(model, head).params
    if train is None or train.lora is None:
        return P
    from .. import lora

    _, m = _meta_model(model, head)
    return lora.trainable_params(m, train.lora, tuple(lora.HEADS) if head != "causal" else ())


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


# ---------------------------------------------------------------- roles

@dataclass
class RoleLoad:
    """What one role's ranks hold and do in one phase (a pipeline stage)."""
    phase: str
    role: str
    model: ModelConfig
    group: GroupConfig
    head: str = "causal"
    train: TrainConfig | None = None
    train_tokens: int = 0         # tokens per training sequence
    train_sequences: int = 1      # sequences per example (2 for preference pairs)
    score_batch: int = 0          # sequences per inference forward
    score_tokens: int = 0
    gen_batch: int = 0            # sequences generated together
    gen_tokens: int = 0           # prompt + new tokens
    notes: list[str] = field(default_factory=list)


def roles_of(cfg: Config, prompt_tokens: int = 128, allow_empty: bool = False) -> list[RoleLoad]:
    """Every role the config's stages start, stage by stage (stages run one after another,
    so only roles of the same phase hold memory together). ``allow_empty``: a config whose
    stages start no role (labelling over HTTP) gives an empty list instead of an error."""
    out: list[RoleLoad] = []
    if cfg.sft is not None:
        s = cfg.sft
        out.append(RoleLoad("sft", "policy", cfg.sft_model(), s.group, train=s.train,
                            train_tokens=s.data.max_length))
    hf_labeler = cfg.labeler.backend.type == "hf"
    lab_model = cfg.labeler.backend.model or cfg.model
    if cfg.label is not None:
        if cfg.label.sample is not None:
            sc = cfg.label.sample
            out.append(RoleLoad("sample", "sampler", sc.model or cfg.model, sc.group, gen_batch=8,
                                gen_tokens=prompt_tokens + sc.max_new_tokens))
        if hf_labeler:
            out.append(RoleLoad("label", "labeler", lab_model, cfg.labeler.backend.group,
                                score_batch=cfg.labeler.backend.batch_size, score_tokens=LABELER_TOKENS))
    if cfg.rm is not None:
        out.append(RoleLoad("rm", "reward", cfg.rm_model(), cfg.rm.group, head="score", train=cfg.rm.train,
                            train_tokens=cfg.rm.data.max_length, train_sequences=2))
    if cfg.ppo is not None:
        p, a = cfg.ppo, cfg.ppo.algo
        seq = prompt_tokens + a.max_new_tokens
        pmodel = p.policy.model or (cfg.sft_model() if cfg.sft is not None else cfg.model)
        out.append(RoleLoad("ppo", "policy", pmodel, p.policy.group, train=p.policy.train, train_tokens=seq,
                            gen_batch=a.rollout_batch_size * a.samples_per_prompt, gen_tokens=seq))
        if a.estimator == "gae":
            out.append(RoleLoad("ppo", "critic", p.critic.model or pmodel, p.critic.group, head="value",
                                train=p.critic.train, train_tokens=seq))
        if p.policy.train.lora is None:  # with LoRA the reference is the policy's base, inside its ranks
            out.append(RoleLoad("ppo", "reference", pmodel, p.reference, score_batch=8, score_tokens=seq))
        from ..rollout import vllm_available

        if cfg.rollout.engine in ("vllm", "hf") or (cfg.rollout.engine == "auto" and vllm_available()):
            # An engine replica holds the policy's weights and its sampling state (vLLM's
            # preallocated KV cache is rollout.kv_cache_gb / gpu_memory_utilization on top).
            out.append(RoleLoad("ppo", "rollout", pmodel, cfg.rollout.group,
                                gen_batch=a.rollout_batch_size * a.samples_per_prompt, gen_tokens=seq))
        for i, r in enumerate(p.rewards):
            if r.type == "rm":
                out.append(RoleLoad("ppo", f"reward{i}" if i else "reward",  # the names rewards.py starts
                                    cfg.rm_model() if r.path is None else ModelConfig(name=r.path), r.group,
                                    head="score", score_batch=r.batch_size, score_tokens=seq))
        if hf_labeler and (any(r.type in ("labeler", "refusal") for r in p.rewards) or p.eval.win_rate):
            out.append(RoleLoad("ppo", "labeler", lab_model, cfg.labeler.backend.group,
                                score_batch=cfg.labeler.backend.batch_size, score_tokens=LABELER_TOKENS))
    if cfg.dpo is not None:
        d = cfg.dpo
        pmodel = d.policy.model or (cfg.sft_model() if cfg.sft is not None else cfg.model)
        out.append(RoleLoad("dpo", "policy", pmodel, d.policy.group, train=d.policy.train,
                            train_tokens=d.data.max_length, train_sequences=2,
                            gen_batch=8, gen_tokens=prompt_tokens + d.eval.max_new_tokens))
        if d.policy.train.lora is None:
            out.append(RoleLoad("dpo", "reference", pmodel, d.reference, score_batch=8,
                                score_tokens=d.data.max_length))
        if hf_labeler and d.prompts is not None and d.eval.win_rate:
            out.append(RoleLoad("dpo", "labeler", lab_model, cfg.labeler.backend.group,
                                score_batch=cfg.labeler.backend.batch_size, score_tokens=LABELER_TOKENS))
    if cfg.steerlm is not None:
        st = cfg.steerlm
        if hf_labeler and any(x not in st.labels.rules for x in st.attributes):
            out.append(RoleLoad("steerlm_label", "labeler", lab_model, cfg.labeler.backend.group,
                                score_batch=cfg.labeler.backend.batch_size, score_tokens=LABELER_TOKENS))
        out.append(RoleLoad("steerlm_annotate", "attributes", st.predictor.model or cfg.rm_model(),
                            st.predictor.group, head="score", train=st.predictor.train,
                            train_tokens=st.predictor.data.max_length))
        out.append(RoleLoad("steerlm", "policy", st.policy.model or cfg.model, st.policy.group, train=st.policy.train,
                            train_tokens=st.data.max_length))
    if cfg.aligner is not None:
        al = cfg.aligner
        out.append(RoleLoad("aligner", "aligner", al.model or cfg.model, al.group, train=al.train,
                            train_tokens=al.data.max_length))
    if not out and not allow_empty:
        raise ConfigError("the config defines no stage to plan (sft, label, rm, ppo or aligner)")
    return out


# ---------------------------------------------------------------- estimates

def _activation_floats_per_token(s: Shape, checkpointing: bool) -> float:
    """Floats saved for backward per token. A pre-norm decoder layer saves its two norms'
    inputs and outputs (4h), the q/k/v input (h), SDPA's query, output (2h) and key/value
    (2 kv), the o-projection input (h), the MLP input (h) and four intermediate-width
    tensors (gate, activation, up, product): 9h + 2kv + 4i. With checkpointing only each
    layer's input is kept, plus one layer recomputed at a time."""
    per_layer = 9 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate
    if checkpointing:
        return s.layers * s.hidden + per_layer
    return s.layers * per_layer + 2 * s.hidden


def estimate(load: RoleLoad) -> dict[str, Any]:
    """Per-rank bytes for one role: device and host, by component."""
    m, g = load.model, load.group
    s = model_shape(m, load.head)
    P, W, z = s.params, g.workers, g.zero.stage
    dtype = m.dtype
    if dtype == "auto":  # what the worker will choose on this kind of device
        from ..models import choose_dtype

        dtype = "bfloat16" if g.gpus_per_worker else choose_dtype("auto", load.train is not None, "cpu")[0]
    b = dtype_bytes(dtype)
    half = b == 2
    gathered = 0.0
    grads32 = 0.0  # the fp32 gradient partition the optimizer reads (moves to the host with it)
    if load.train is not None:
        params = b * P / (W if z == 3 else 1)
        T = trainable_params(m, load.head, load.train)  # P, or LoRA's adapters (+ head)
        master = 4 * T if half else 0
        if z == 0:
            grads = b * T + (4 * T if half else 0)
            optim = 8 * T + master
        else:
            # DeepSpeed (0.19) reduces gradients into each rank's partition in stage 1
            # as in stage 2 (measured: benchmarks/results/scaling.json).
            grads = b * T / W if half else 0.0
            grads32 = 4 * T / W
            optim = (8 * T + master) / W
        if T < P:
            params += b * T / (W if z == 3 else 1)  # the adapters sit beside the frozen base
        if z == 3:
            gathered = b * min(P, g.zero.max_live_parameters)
        tokens = load.train.micro_batch_size * load.train_sequences * load.train_tokens
        acts = b * tokens * _activation_floats_per_token(s, m.gradient_checkpointing)
        # Logits upcast to fp32, and log-softmax's output kept for backward.
        acts += 2 * 4 * tokens * s.logits_width
    else:
        params = b * P / (W if z == 3 else 1)
        grads = optim = 0.0
        if z == 3:
            gathered = b * min(P, g.zero.max_live_parameters)
        acts = 0.0
    if load.score_batch:
        tokens = load.score_batch * load.score_tokens
        # One layer's transient tensors at a time, plus the logits and their log-softmax.
        acts = max(acts, b * tokens * (2 * s.hidden + s.intermediate) + 2 * 4 * tokens * s.logits_width)
    kv = 0.0
    if load.gen_batch:
        kv = 2 * s.layers * s.kv_dim * b * load.gen_batch * load.gen_tokens
        step_logits = 4 * load.gen_batch * s.vocab * 2
        acts = max(acts, step_logits)
    off_opt = g.zero.offload_optimizer and load.train is not None
    off_par = g.zero.offload_params
    host = (optim + grads32 if off_opt else 0.0) + (params if off_par else 0.0)
    grads_all = grads + grads32
    device = params * (not off_par) + grads + (0.0 if off_opt else optim + grads32) + gathered + acts + kv
    return {"phase": load.phase, "role": load.role, "model": m.name, "params_n": P, "ranks": W, "zero": z,
            "trainable_n": trainable_params(m, load.head, load.train) if load.train is not None else 0,
            "dtype": m.dtype, "train": load.train is not None,
            "params": params, "grads": grads_all, "optimizer": optim, "gathered": gathered,
            "activations": acts, "kv_cache": kv, "device": device, "host": host,
            "state": params + grads_all + optim}


# ---------------------------------------------------------------- clusters

@dataclass
class NodeSpec:
    count: int
    cpus: float
    gpus: int = 0
    gpu_memory_gb: float = 0.0
    memory_gb: float = 0.0


def _size_gb(text: str) -> float:
    t = str(text).strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 1024.0), ("GB", 1.0), ("MB", 1 / 1024)):
        if t.endswith(unit):
            return float(t[:-len(unit)]) * mult
    return float(t)


def local_nodes() -> list[NodeSpec]:
    mem = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 1024**2
    except OSError:
        pass
    gpus, gmem = 0, 0.0
    try:
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            gmem = torch.cuda.get_device_properties(0).total_memory / GB
    except Exception:
        pass
    return [NodeSpec(1, float(os.cpu_count() or 1), gpus, gmem, mem)]


def parse_cluster(spec: str | None) -> tuple[str, list[NodeSpec]]:
    """``None``/``local``: this machine. A YAML file with ``nodes: [{count, cpus, gpus,
    gpu_memory_gb, memory_gb}]``. Or a short form ``[N*]GxSIZE[,cpus=C][,mem=SIZE]``,
    e.g. ``8x80GB`` (one node, 8 GPUs of 80 GB) or ``2*8x80GB,cpus=96,mem=1TB``."""
    if spec in (None, "", "local"):
        return "this machine", local_nodes()
    path = Path(spec)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise PlanError(f"cluster spec {spec}: no such file")
        doc = yaml.safe_load(path.read_text()) or {}
        rows = doc.get("nodes") if isinstance(doc, dict) else None
        if not isinstance(rows, list) or not rows:
            raise PlanError(f"cluster spec {spec}: needs `nodes:`, a list of {{count, cpus, gpus, "
                            "gpu_memory_gb, memory_gb}}")
        nodes = []
        for i, r in enumerate(rows):
            try:
                nodes.append(NodeSpec(int(r.get("count", 1)), float(r["cpus"]), int(r.get("gpus", 0)),
                                      _size_gb(r.get("gpu_memory_gb", 0)), _size_gb(r.get("memory_gb", 0))))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise PlanError(f"cluster spec {spec}: nodes[{i}] is invalid ({exc!r}); give cpus, and "
                                "gpus/gpu_memory_gb/memory_gb as numbers") from None
        return str(doc.get("name") or path.name), nodes
    head, *opts = spec.split(",")
    count = 1
    if "*" in head:
        c, head = head.split("*", 1)
        count = int(c)
    try:
        g, size = head.lower().split("x", 1)
        gpus, gmem = int(g), _size_gb(size)
    except ValueError:
        raise PlanError(f"cluster spec {spec!r}: expected a YAML file or [NODES*]GPUSxSIZE, e.g. 8x80GB "
                        "or 2*8x80GB,cpus=96,mem=1TB") from None
    kv = dict(o.split("=", 1) for o in opts if "=" in o)
    cpus = float(kv.get("cpus", 12 * gpus))
    mem = _size_gb(kv["mem"]) if "mem" in kv else 2 * gpus * gmem
    return spec, [NodeSpec(count, cpus, gpus, gmem, mem)]


# ---------------------------------------------------------------- the plan

def make_plan(cfg: Config, cluster: str | None = None, prompt_tokens: int = 128,
              reserve_gb: float | None = None) -> dict[str, Any]:
    """Estimates for every role, and the fit of each phase on the cluster. ``ok`` is False
    with ``problems`` naming each reason."""
    name, nodes = parse_cluster(cluster)
    any_gpu = any(n.gpus for n in nodes)
    reserve = (1.0 if any_gpu else 0.5) if reserve_gb is None else reserve_gb
    loads = roles_of(cfg, prompt_tokens)
    rows = [estimate(load) for load in loads]
    problems: list[str] = []
    for phase in dict.fromkeys(r["phase"] for r in rows):
        phase_loads = [(lo, r) for lo, r in zip(loads, rows) if r["phase"] == phase]
        groups = {lo.role: lo.group for lo, _ in phase_loads}
        try:
            pools = plan_pools(groups)
        except PlacementError as exc:
            problems.append(f"{phase}: {exc}")
            continue
        # Bundles also carry memory: host bytes per rank (everything for a CPU rank), and
        # device bytes per GPU rank, checked against one device.
        host_need: dict[str, float] = {}
        dev_need: dict[str, float] = {}
        for lo, r in phase_loads:
            root = next(p for p in pools.values() if lo.role in p.roles).name
            on_gpu = lo.group.gpus_per_worker > 0
            host = r["host"] + (0 if on_gpu else r["device"]) + reserve * GB
            host_need[root] = host_need.get(root, 0) + host
            if on_gpu:
                if not any_gpu:
                    problems.append(f"{phase}/{lo.role}: asks for GPUs, and the cluster ({name}) has none")
                dev_need[root] = dev_need.get(root, 0) + r["device"] + reserve * GB
        for pool in pools.values():
            pool.bundle = dict(pool.bundle) | {"memory": host_need.get(pool.name, 0) / GB}
            if pool.name in dev_need:
                per_gpu = dev_need[pool.name] / max(1.0, pool.bundle.get("GPU", 1.0))
                gmem = max((n.gpu_memory_gb for n in nodes if n.gpus), default=0.0)
                if gmem and per_gpu > gmem * GB:
                    roles = ", ".join(pool.roles)
                    problems.append(
                        f"{phase}/{roles}: needs {per_gpu / GB:.1f} GB per GPU rank (incl. {reserve:g} GB runtime "
                        f"reserve), the GPUs have {gmem:g} GB — use a higher ZeRO stage, more workers, offload, "
                        "gradient checkpointing or a smaller micro-batch")
        flat = [{"CPU": n.cpus, "GPU": float(n.gpus), "memory": n.memory_gb}
                for n in nodes for _ in range(n.count)]
        try:
            check_feasible(list(pools.values()), flat)
        except PlacementError as exc:
            problems.append(f"{phase}: {exc} (memory in GB)")
    return {"cluster": name, "nodes": [n.__dict__ for n in nodes], "reserve_gb": reserve,
            "prompt_tokens": prompt_tokens, "roles": rows, "ok": not problems, "problems": problems}


def _fmt(n: float) -> str:
    if n == 0:
        return "-"
    for unit, d in (("TB", 1024**4), ("GB", GB), ("MB", 1024**2)):
        if n >= d:
            return f"{n / d:.2f} {unit}" if n < 10 * d else f"{n / d:.0f} {unit}"
    return f"{n / 1024:.0f} KB"


def format_plan(plan: dict[str, Any]) -> str:
    cols = ["phase", "role", "params", "ranks", "ZeRO", "weights", "grads", "optim", "gathered", "activ.",
            "KV", "device/rank", "host/rank"]
    lines = [cols]
    for r in plan["roles"]:
        n = r["params_n"]
        lora = r["train"] and 0 < r["trainable_n"] < n
        lines.append([r["phase"], r["role"] + ("" if r["train"] else " (infer)")
                      + (f" (LoRA {r['trainable_n'] / 1e6:.1f}M)" if lora else ""),
                      f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M", str(r["ranks"]), str(r["zero"]),
                      _fmt(r["params"]), _fmt(r["grads"]), _fmt(r["optimizer"]), _fmt(r["gathered"]),
                      _fmt(r["activations"]), _fmt(r["kv_cache"]), _fmt(r["device"]), _fmt(r["host"])])
    widths = [max(len(row[i]) for row in lines) for i in range(len(cols))]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in lines]
    nodes = "; ".join(f"{n['count']} x ({n['cpus']:g} CPUs, {n['gpus']} GPUs"
                      + (f" of {n['gpu_memory_gb']:g} GB" if n["gpus"] else "")
                      + f", {n['memory_gb']:.0f} GB RAM)" for n in plan["nodes"])
    out += ["", f"cluster: {plan['cluster']}: {nodes}",
            f"tensor memory per rank; fit adds {plan['reserve_gb']:g} GB runtime reserve per rank; "
            f"prompts for PPO and sampling assumed {plan['prompt_tokens']} tokens (--prompt-tokens), a labeler's "
            f"{LABELER_TOKENS}"]
    out.append("fits: yes" if plan["ok"] else "DOES NOT FIT:\n" + "\n".join(f"  - {p}" for p in plan["problems"]))
    return "\n".join(out)

