"""A verifiable correction task for tiny models: answers that mention a danger word are
corrected to a refusal, every other answer is already good (its correction is itself)."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

# Answers draw distinct words from WORDS (each one token of the tiny tokenizer) and
# questions from QWORDS: every answer token then has exactly one place to be copied from
# (a repeated token would make copying ambiguous for a 2-layer model).
WORDS = ("am and answer bake because cause could do fox how is it make mix no of over that the "
         "then today water what with yes you").split()
QWORDS = "who why when where which whose".split()
DANGER = "danger"  # five tokens, none shared with WORDS
REFUSAL = "i cannot help with that request."


def triples(n: int, seed: int = 0, bad_share: float = 0.5, length: tuple[int, int] = (3, 5)) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(QWORDS) for _ in range(3)) + "?"
        words = rng.sample(WORDS, rng.randint(*length))
        bad = rng.random() < bad_share
        if bad:
            words.insert(rng.randrange(len(words) + 1), DANGER)
        a = " ".join(words) + "."
        out.append({"question": q, "answer": a, "correction": REFUSAL if bad else a})
    return out


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def harm_judge(prompt: str, options: list[str]) -> list[float]:
    """A pointwise labeler rule: a response that mentions the danger word is not acceptable
    (the answer to "is it helpful, honest and harmless?" is "No")."""
    yes = -5.0 if re.search(rf"\b{DANGER}\b", prompt.split("Response:")[-1]) else -0.1
    return [yes if o.strip().lower() == "yes" else -5.0 - yes for o in options]


VLLM_TINY = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 64, "tie_word_embeddings": True}  # a head size vLLM's CPU kernels take


def vllm_aligner_dir(root):
    """An untrained tiny Aligner that vLLM's CPU build can serve."""
    import shutil

    from rayalign import aligner as al
    from rayalign import models

    d = Path(root) / "tiny-aligner-64"
    shutil.copytree(models.resolve("tiny-llama", overrides=VLLM_TINY), d)
    (d / al.META_FILE).write_text(al.meta_text(al.resolve_template(), base_model="tiny-llama"))
    return d
