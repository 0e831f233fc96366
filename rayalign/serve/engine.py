"""The Aligner's inference engine: plain Python, no Ray. The Serve replica wraps it; tests
and the GPU check call it directly."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..aligner import find_model_dir, read_meta


class AlignerEngine:
    def __init__(self, checkpoint: str | Path, dtype: str = "float32", threads: int | None = None,
                 device: str | None = None):
        import torch

        from ..models import load_causal_lm, load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = find_model_dir(checkpoint)
        self.template, self.meta = read_meta(self.model_dir)
        self.tok = load_tokenizer(self.model_dir)
        self.tok.padding_side = "left"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_causal_lm(self.model_dir, dtype).to(self.device).eval()
        self.model.config.use_cache = True
        self.name = self.meta.get("name") or self.model_dir.parent.name + "/" + self.model_dir.name

    def prompt(self, question: str, answer: str) -> str:
        from ..data import chat_prompt

        return chat_prompt(self.tok, self.template.render(question, answer))

    def input_tokens(self, question: str, answer: str) -> int:
        return len(self.tok(self.prompt(question, answer), add_special_tokens=False)["input_ids"])

    def correct(self, items: list[tuple[str, str]], max_new_tokens: int = 128, temperature: float = 0.0,
                top_p: float = 1.0, min_new_tokens: int = 0) -> list[dict[str, Any]]:
        """Corrections of (question, answer) items, generated as one left-padded batch."""
        import torch

        if not items:
            return []
        enc = self.tok([self.prompt(q, a) for q, a in items], return_tensors="pt", padding=True,
                       add_special_tokens=False).to(self.device)
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                  pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kw.update(do_sample=False)
        with torch.no_grad():
            out = self.model.generate(**enc, **kw)
        gen = out[:, enc["input_ids"].shape[1]:]
        res = []
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        for (q, a), row in zip(items, gen.tolist()):
            n = next((i for i, t in enumerate(row) if t in (eos, pad)), len(row))
            text = self.tok.decode(row[:n], skip_special_tokens=True).strip()
            res.append({"correction": text, "copied": text == a.strip(), "new_tokens": n,
                        "truncated": n == len(row)})
        return res
