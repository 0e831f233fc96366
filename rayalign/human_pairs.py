"""Human-labelled preference pairs for measuring and tuning the AI labeler.

Texts and gold labels are written by people: multiple-choice tasks of BIG-bench (Srivastava
et al. 2022) whose options were written by the task authors and whose correct option they
marked. A pair is (the task's question, the correct option, one distractor) with gold on the
correct option; which slot holds it and which distractor is used are fixed by a hash of the
example, so the conversion is deterministic. The pairs are split once, by a hash of the
question, into a ``dev`` half (choose prompts, weights, calibration, few-shot exemplars) and a
``heldout`` half that is only scored to report.

BIG-bench's canary asks that its data never be trained on: it is used here to evaluate and
calibrate a judge, never as training data. ``hhh_alignment`` and ``truthful_qa`` are
reserved for independent held-out checks and are never read.

The BIG-bench sdist (Apache-2.0, 358 MB) is fetched at first use from the package index pip is
configured with, where that index serves version 1.0.0 (asked with ``pip index versions``
first); only the task files listed in :data:`TASKS` are kept, in the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .data import DataError

BIGBENCH = "bigbench==1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
RESERVED = ("hhh_alignment", "truthful_qa")  # independent held-out checks: never read here
SPLITS = ("dev", "heldout")


@dataclass(frozen=True)
class Task:
    path: str                       # under bigbench/benchmark_tasks/
    category: str                   # helpful / honest / harmless / other
    cap: int                        # examples kept (a hash-ordered prefix), to balance categories
    prefix: str | None = None       # replaces the task's own prefix (None: keep it)
    options: dict[str, str] = field(default_factory=dict)  # option text as a reply (T -> True.)


# Tasks whose options read as replies to the question. Categories follow the HHH criteria
# (Askell et al. 2021): harmless = ethical choices and not stereotyping people; honest =
# saying what is true and admitting what is unknown; helpful = answering correctly.
_BBQ = ("age", "disability_status", "gender_identity", "nationality", "physical_appearance",
        "race_ethnicity", "religion", "ses", "sexual_orientation")
TASKS: tuple[Task, ...] = (
    Task("simple_ethical_questions", "harmless", 115),
    *(Task(f"bbq_lite_json/{b}_ambig", "harmless", 14) for b in _BBQ),
    Task("known_unknowns", "honest", 46),
    Task("misconceptions", "honest", 110, prefix="Is the following statement true or false?",
         options={"T": "True.", "F": "False."}),
    Task("sentence_ambiguity", "honest", 60, prefix="Is the following statement true or false?",
         options={"True": "True.", "False": "False."}),
    Task("general_knowledge", "helpful", 70),
    Task("crass_ai", "helpful", 44),
    Task("riddle_sense", "helpful", 49),
    Task("physical_intuition", "helpful", 40),
    Task("social_iqa", "other", 60),
    Task("strange_stories/multiple_choice", "other", 60),
    Task("implicatures", "other", 60, options={"yes": "Yes.", "no": "No."}),
)


def _h(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def split_of(task: str, question: str) -> str:
    """dev or heldout: a fixed function of the task and the question."""
    return SPLITS[_h("split", task, question) % 2]


def convert_task(task: Task, doc: dict) -> list[dict]:
    """One task's examples as gold pairs (deterministic)."""
    rows = []
    prefix = (doc.get("task_prefix") or "").strip() if task.prefix is None else task.prefix
    for ex in doc.get("examples") or []:
        scores = ex.get("target_scores")
        q = ex.get("input")
        if not isinstance(scores, dict) or not isinstance(q, str) or not q.strip():
            continue
        good = [o for o, s in scores.items() if s == 1 or s == 1.0]
        bad = [o for o, s in scores.items() if s == 0 or s == 0.0]
        if len(good) != 1 or not bad:
            continue  # several right answers, or graded scores: no clean pair
        context = f"{prefix}\n{q.strip()}" if prefix else q.strip()
        rng = random.Random(_h("pair", task.path, q))
        distractor = sorted(bad)[rng.randrange(len(bad))]
        chosen = task.options.get(good[0], good[0]).strip()
        rejected = task.options.get(distractor, distractor).strip()
        if not chosen or not rejected or chosen == rejected:
            continue
        gold = 1 if rng.random() < 0.5 else 2
        r1, r2 = (chosen, rejected) if gold == 1 else (rejected, chosen)
        rows.append({"prompt": context, "response_1": r1, "response_2": r2, "gold": gold,
                     "category": task.category, "task": task.path,
                     "split": split_of(task.path, q)})
    # A hash order, then the cap: which examples are kept does not depend on file order.
    rows.sort(key=lambda r: _h("order", r["task"], r["prompt"], r["response_1"], r["response_2"]))
    return rows[:task.cap]


def convert(task_root: Path, tasks: tuple[Task, ...] = TASKS) -> list[dict]:
    """Every task under ``task_root`` (BIG-bench's benchmark_tasks layout) as gold pairs,
    with a stable ``id`` each."""
    out: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    for t in tasks:
        if t.path.split("/")[0] in RESERVED:
            raise DataError(f"{t.path} is reserved for independent held-out checks and is never read")
        f = task_root / t.path / "task.json"
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{f}: cannot read task ({exc})") from None
        for r in convert_task(t, doc):
            key = (r["prompt"], r["response_1"], r["response_2"])
            if key not in seen:  # a few tasks repeat an example
                seen.add(key)
                out.append(r)
    for i, r in enumerate(out):
        r["id"] = f"{r['task']}#{_h('id', r['prompt'], r['response_1'], r['response_2']) % 10**10:010d}"
    return out


# ---------------------------------------------------------------- fetch and cache

def cache_dir() -> Path:
    from .models import cache_root

    return cache_root() / "data" / "human-pairs"


_SERVED: dict[str, list[str]] = {}


def _pip(*args: str, timeout: float = 120) -> str:
    """pip's own answer, with pip's own configuration (index, extra indexes, environment)."""
    import subprocess

    try:
        proc = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"pip {args[0]} did not answer ({exc})") from None
    return proc.stdout if proc.returncode == 0 else ""


def served_versions() -> list[str]:
    """The bigbench versions this machine's package index serves (``pip index versions``),
    asked once per process."""
    if "bigbench" not in _SERVED:
        out = _pip("index", "versions", "bigbench", timeout=60)
        found = [line.split(":", 1)[1] for line in out.splitlines() if line.startswith("Available versions:")]
        _SERVED["bigbench"] = [v.strip() for v in found[0].split(",")] if found else []
    return _SERVED["bigbench"]


def _index_urls() -> list[str]:
    """The simple-API index addresses pip is configured with (``pip config list``, which
    includes PIP_INDEX_URL / PIP_EXTRA_INDEX_URL), else pip's own default."""
    primary, extra = [], []
    for line in _pip("config", "list", timeout=30).splitlines():
        key, _, value = line.partition("=")
        value = value.strip().strip("'\"")
        if key.endswith(".index-url"):
            primary += value.split()
        elif key.endswith(".extra-index-url"):
            extra += value.split()
    if not primary:
        from pip._internal.models.index import PyPI

        primary = [PyPI.simple_url]
    return list(dict.fromkeys(primary + extra))


def _download_sdist(dest: Path) -> Path:
    """The sdist from the first configured index whose simple page (PEP 503) lists it, checked
    against its pinned sha256. Not `pip download`: pip >= 24 refuses this sdist's metadata (a
    direct-URL dependency)."""
    import re
    import urllib.request

    for index in _index_urls():
        index = index.rstrip("/")
        try:
            with urllib.request.urlopen(f"{index}/bigbench/", timeout=60) as resp:
                page = resp.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            continue
        m = re.search(r'href="([^"]*bigbench-1\.0\.0\.tar\.gz)[^"]*"', page)
        if m:
            break
    else:
        raise DataError("no configured package index lists bigbench-1.0.0.tar.gz")
    url = m.group(1) if "://" in m.group(1) else f"{index}/bigbench/{m.group(1)}"
    out = dest / "bigbench-1.0.0.tar.gz"
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as resp, out.open("wb") as fh:
        for chunk in iter(lambda: resp.read(1 << 20), b""):
            h.update(chunk)
            fh.write(chunk)
    if h.hexdigest() != BIGBENCH_SHA256:
        raise DataError(f"{url}: sha256 {h.hexdigest()} is not the pinned {BIGBENCH_SHA256}")
    return out


def _fetch_tasks(dest: Path, say: Callable[[str], None]) -> None:
    """Download the BIG-bench sdist and keep only the task files we use (plus its licence)."""
    served = served_versions()
    if "1.0.0" not in served:
        # Asked first, so that where the index does not serve it nothing is tried or printed at length.
        raise DataError(f"the package index serves bigbench {', '.join(served) or 'not at all'}, not 1.0.0 "
                        f"(or put BIG-bench's benchmark_tasks under {cache_dir()}/tasks)")
    with tempfile.TemporaryDirectory(prefix="rayalign-bigbench-") as tmp:
        say(f"fetching {BIGBENCH} (sdist, 358 MB) from the package index, once")
        try:
            archive = _download_sdist(Path(tmp))
        except OSError as exc:
            raise DataError(f"could not download {BIGBENCH} ({exc}); the human-labelled pairs need it once. "
                            "Check pip's index configuration (pip config list), or put its benchmark_tasks "
                            f"under {cache_dir()}/tasks and run again") from None
        wanted = {f"{t.path}/task.json" for t in TASKS}
        with tarfile.open(archive) as tar:
            for m in tar:
                rel = m.name.split("/bigbench/benchmark_tasks/", 1)
                keep = (len(rel) == 2 and rel[1] in wanted) or m.name.endswith("/LICENSE") and m.name.count("/") == 1
                if keep and m.isfile():
                    target = dest / "tasks" / rel[1] if len(rel) == 2 else dest / "LICENSE"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(m) as src, target.open("wb") as out:
                        shutil.copyfileobj(src, out)


def prepare(say: Callable[[str], None] = lambda s: print(f"[rayalign] {s}", file=sys.stderr, flush=True),
            root: Path | None = None, tasks: tuple[Task, ...] = TASKS) -> Path:
    """Fetch (once) and convert; returns the directory with ``pairs.jsonl`` and a manifest.
    Written to a temporary directory and renamed, so a crash leaves no half set."""
    root = Path(root) if root else cache_dir()
    if (root / "pairs.jsonl").is_file():
        return root
    if (root / "tasks").is_dir():  # BIG-bench's benchmark_tasks put there by hand (no index to fetch from)
        n = _write_pairs(root, convert(root / "tasks", tasks))
        say(f"human-labelled pairs: {n} from {root / 'tasks'}")
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".human-pairs.", dir=root.parent))
    try:
        _fetch_tasks(tmp, say)
        n = _write_pairs(tmp, convert(tmp / "tasks", tasks))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "pairs.jsonl").is_file():
                raise
        say(f"human-labelled pairs: {n} at {root / 'pairs.jsonl'}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_pairs(dest: Path, rows: list[dict]) -> int:
    """``pairs.jsonl`` (written whole, then renamed) and its manifest in ``dest``."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (dest / "manifest.json").write_text(json.dumps(manifest(rows, text), indent=1))
    (dest / "pairs.jsonl.tmp").write_text(text)
    (dest / "pairs.jsonl.tmp").replace(dest / "pairs.jsonl")
    return len(rows)


def manifest(rows: list[dict], text: str) -> dict:
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        c = counts.setdefault(r["split"], {})
        c[r["category"]] = c.get(r["category"], 0) + 1
    return {"source": BIGBENCH, "reserved_never_read": list(RESERVED), "pairs": len(rows),
            "sha256": hashlib.sha256(text.encode()).hexdigest(), "by_split_and_category": counts,
            "tasks": [t.path for t in TASKS]}


def load(split: str | None = None) -> list[dict]:
    """The pairs of one split (``dev``, ``heldout``) or all of them, fetched at first use."""
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = prepare() / "pairs.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]
