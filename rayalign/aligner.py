"""The Aligner's data side: its versioned prompt template, the metadata stored with every
checkpoint, and question–answer–correction triples (read, or derived from preference pairs).

An Aligner (Ji et al. 2024) is a causal LM trained on ``template(question, answer) →
correction``; it corrects the answers of another model without touching its weights.
The template is part of the model: a checkpoint records it in ``aligner.json`` and the
server renders requests with that record, never with whatever the code's default is.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import data
from .data import DataError
from .errors import RayalignError

META_FILE = "aligner.json"

# Versions are append-only: a served checkpoint names the version it was trained with.
TEMPLATES: dict[str, str] = {
    "aligner-v1": "##Question: {question}\n##Answer: {answer}\n##Correction: ",
    # The question and answer as quoted blocks: every line of them starts with "> ", so no
    # text in them can begin a line of the template's own or look like a new chat turn.
    "aligner-v2": "##Question:\n> {question}\n##Answer:\n> {answer}\n##Correction: ",
}
DEFAULT_TEMPLATE = "aligner-v2"  # measured: benchmarks/README.md, injection.py
_SLOT = re.compile(r"\{(question|answer)\}")
_BAR = re.compile(r"[^\w\s{}]+ ?")  # a slot's line prefix that quotes it, as "> "


class AlignerError(RayalignError, ValueError):
    pass


# An invisible character that ends a marker: user text keeps its look, but no longer
# tokenises as the template's markers or a special token.
JOINER = "\u2060"
# Special-token forms of the common chat templates (ChatML and Llama 3's <|...|>,
# Llama 2's <s> </s> [INST]); none may reach the tokenizer from user text.
SPECIAL_HEADS = ("<|", "|>", "</s>", "<s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def neutralise(text: str, markers: tuple[str, ...] = ()) -> str:
    """``text`` with a :data:`JOINER` inside every occurrence of a marker and of a special
    token's head, so a question or answer cannot end its own section, open a fake one, or
    close the chat turn. Text without them is unchanged. Output is cleaned with
    :func:`unjoin`."""
    for m in sorted(set(markers) | set(SPECIAL_HEADS), key=len, reverse=True):
        if len(m) > 1 and m in text:
            text = text.replace(m, m[0] + JOINER + m[1:])
    return text


def unjoin(text: str) -> str:
    return text.replace(JOINER, "")


@dataclass(frozen=True)
class AlignerTemplate:
    version: str
    text: str

    def __post_init__(self):
        found = set(_SLOT.findall(self.text))
        if found != {"question", "answer"}:
            raise AlignerError(f"aligner template {self.version!r} must contain {{question}} and {{answer}} "
                               f"exactly as slots (found {sorted(found) or 'none'})")

    def render(self, question: str, answer: str) -> str:
        """The user turn the Aligner sees. One pass over the slots, so braces inside the
        question or answer are text, not slots; and the question and answer are
        :func:`neutralised <neutralise>` first, so no text in them reads as one of the
        template's markers or as a chat template's special token."""
        values = {"question": neutralise(question, self.markers), "answer": neutralise(answer, self.markers)}

        def fill(m: re.Match) -> str:
            value = values[m.group(1)]
            bar = self.text[self.text.rfind("\n", 0, m.start()) + 1:m.start()]
            if bar and _BAR.fullmatch(bar):  # a quoted slot: its bar starts each of its lines
                value = re.sub(r"\r\n|\r|\n|\u2028|\u2029|\x85|\x0b|\x0c", "\n" + bar, value)
            return value
        return _SLOT.sub(fill, self.text)

    @property
    def markers(self) -> tuple[str, ...]:
        """What user text must not reproduce: the head of each literal part of the template
        (its leading run of punctuation, as ``##`` of ``##Correction:``, or the whole part
        where it has none)."""
        out = []
        parts = _SLOT.split(self.text)[::2]  # split keeps the slot names at odd places
        for i, part in enumerate(parts):
            lines = part.split("\n")
            if i < len(parts) - 1 and _BAR.fullmatch(lines[-1]):
                lines = lines[:-1]  # a quote bar before a slot: user lines start with it anyway
            for line in lines:
                line = line.strip()
                if line:
                    head = re.match(r"[^\w\s]{2,}", line)
                    out.append(head.group(0) if head else line)
        return tuple(dict.fromkeys(out))

    def to_dict(self) -> dict[str, str]:
        return {"template_version": self.version, "template": self.text}


def resolve_template(version: str = DEFAULT_TEMPLATE, text: str | None = None) -> AlignerTemplate:
    """A named template, or a custom text under a new version name."""
    if text is not None:
        if version in TEMPLATES and TEMPLATES[version] != text:
            raise AlignerError(f"template version {version!r} is a built-in with different text; "
                               "give a custom template its own version name")
        return AlignerTemplate(version, text)
    if version not in TEMPLATES:
        raise AlignerError(f"unknown aligner template {version!r}; known: {', '.join(TEMPLATES)} "
                           "(or set aligner.template_text with a new version name)")
    return AlignerTemplate(version, TEMPLATES[version])


def meta_text(template: AlignerTemplate, **extra: Any) -> str:
    return json.dumps({"kind": "aligner", **template.to_dict(), **extra}, indent=2, sort_keys=True)


def read_meta(model_dir: str | Path) -> tuple[AlignerTemplate, dict[str, Any]]:
    """The template (and the rest of the record) a checkpoint was trained with."""
    f = Path(model_dir) / META_FILE
    if not f.is_file():
        raise AlignerError(f"{model_dir} has no {META_FILE}: not an Aligner checkpoint "
                           "(train one with `rayalign aligner train`)")
    try:
        meta = json.loads(f.read_text())
        return AlignerTemplate(meta["template_version"], meta["template"]), meta
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AlignerError(f"{f}: unreadable aligner record ({exc})") from None


def find_model_dir(path: str | Path) -> Path:
    """An exported Aligner or a run directory → the HF model directory holding
    ``aligner.json``. (Checkpoints hold sharded training state, not a servable model.)"""
    p = Path(path).expanduser()
    if not p.exists():
        raise AlignerError(f"{p} does not exist")
    for cand in (p, p / "model", p / "final" / "aligner"):
        if (cand / META_FILE).is_file():
            return cand
    raise AlignerError(f"{p}: no Aligner model found (looked for {META_FILE} in it, in model/ and in "
                       "final/aligner/; a run that has not finished has no servable model yet)")


# ---------------------------------------------------------------- triples

FIELDS = ("question", "answer", "correction")


def load_triples(source: str, question: str = "question", answer: str = "answer",
                 correction: str = "correction", max_samples: int | None = None, seed: int = 0) -> list[dict]:
    """Triples from any data source, renamed to ``question/answer/correction``."""
    rows = data.load_rows(source, [question, answer, correction], max_samples, seed)
    return [{"question": r[question], "answer": r[answer], "correction": r[correction]} for r in rows]


def triples_from_pairs(source: str, prompt: str = "prompt", max_samples: int | None = None,
                       seed: int = 0) -> list[dict]:
    """Preference pairs → triples (rejected → chosen). Accepts ``chosen``/``rejected`` rows,
    or ``response_1``/``response_2`` with ``gold`` (1/2) or ``preference`` (P(1 ≻ 2));
    ties are skipped."""
    rows, origin = data.read_rows(source)
    if not rows:
        raise DataError(f"{origin}: no rows")
    out = []
    for i, r in enumerate(rows, 1):
        if "chosen" in r and "rejected" in r:
            data.validate_rows([r], [prompt, "chosen", "rejected"], f"{origin} (row {i})")
            good, bad = r["chosen"], r["rejected"]
        else:
            data.validate_rows([r], [prompt, "response_1", "response_2"], f"{origin} (row {i})")
            key = "gold" if r.get("gold") is not None else "preference"
            if r.get(key) is None:
                raise DataError(f"{origin}: row {i}: a pair needs chosen/rejected, or gold or preference")
            p = data.preference_p(r[key], origin, i)
            if p == 0.5:
                continue
            good, bad = (r["response_1"], r["response_2"]) if p > 0.5 else (r["response_2"], r["response_1"])
        if good.strip() == bad.strip():
            continue
        out.append({"question": r[prompt], "answer": bad, "correction": good})
    import random

    random.Random(seed).shuffle(out)
    return out[:max_samples] if max_samples else out


def encode(tok, template: AlignerTemplate, question: str, answer: str, target: str,
           max_length: int) -> dict | None:
    """Token ids and labels with the loss on ``target`` and the end of turn only; ``None``
    when the target would not fit whole (a cut correction teaches the model to stop early)."""
    ex = data.encode_sft(tok, template.render(question, answer), target, 10**9)
    if len(ex["input_ids"]) > max_length:
        return None
    return ex
