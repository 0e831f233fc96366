"""LoRA adapters (through PEFT) on a role's model, and the merged weights that leave it.

A role with ``train.lora`` wraps its model in PEFT's LoRA before the DeepSpeed engine is
built: the base weights are frozen, so the optimizer (and with it every checkpoint shard,
which holds what the optimizer owns) covers only the adapters and any new head. What
leaves the role for another program — the HF export, the rollout engines' weights — is
the merged model under the base model's own parameter names: W + (alpha / r) B A.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .config import LoraConfig

PREFIX = "base_model.model."
HEADS = ["score", "classifier"]  # the new heads of value and reward models


def apply(module, lc: LoraConfig, task: str, seed: int):
    """``module`` with LoRA adapters. ``task``: PEFT's task type (CAUSAL_LM, TOKEN_CLS,
    SEQ_CLS); for the classification ones PEFT also trains the new head. Every rank draws
    the same adapter initialisation from ``seed``."""
    import peft

    heads = HEADS if task != "CAUSAL_LM" else None  # trained in full (PEFT's modules_to_save), not adapted
    cfg = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                          target_modules=lc.target_modules, task_type=task, exclude_modules=heads)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return peft.get_peft_model(module, cfg)
    finally:
        torch.random.set_rng_state(state)


def scale(lc: LoraConfig) -> float:
    return lc.alpha / lc.r


def merged(named: Iterator[tuple[str, torch.Tensor | None]], lc: LoraConfig
           ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """A PEFT model's parameters, one at a time and in order, as the base architecture's
    parameters: each adapted layer's weight merged with its adapter, a trained head under
    its own name, the head's frozen original dropped. Holds one layer's base weight at a
    time. ``None`` tensors (a rank that only takes part in a ZeRO-3 gather) stay ``None``;
    meta tensors give the names and shapes without computing anything."""
    s = scale(lc)
    pending: dict[str, torch.Tensor | None] = {}
    for name, t in named:
        n = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if ".lora_A." in n:
            pending[n.split(".lora_A.")[0] + ".A"] = t
        elif ".lora_B." in n:
            path = n.split(".lora_B.")[0]
            base, a = pending.pop(path + ".W"), pending.pop(path + ".A")
            if base is None or a is None or t is None:
                yield path + ".weight", None
            else:
                delta = t.float() @ a.float()
                yield path + ".weight", (base.float() + s * delta).to(base.dtype)
        elif ".base_layer." in n:
            path, leaf = n.split(".base_layer.")
            if leaf == "weight":
                pending[path + ".W"] = t
            else:
                yield f"{path}.{leaf}", t
        elif ".original_module." in n:
            continue
        else:
            yield n.replace(".modules_to_save.default.", "."), t
    if pending:
        raise ValueError(f"LoRA merge: adapters without both halves: {sorted(pending)[:4]}")


def trainable_params(model, lc: LoraConfig, trained_heads: tuple[str, ...] = ()) -> int:
    """Parameters LoRA trains on ``model`` (a meta-device model is enough): r x (in + out)
    for each targeted linear layer, plus every parameter of a trained head."""
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = 0
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in trained_heads:
            n += sum(p.numel() for p in mod.parameters())
            continue
        if not isinstance(mod, torch.nn.Linear) or mod is out_head:
            continue
        if lc.target_modules == "all-linear" or leaf in lc.target_modules:
            n += lc.r * (mod.in_features + mod.out_features)
    return n
