"""`rayalign label`: turn prompts (and response pairs, or samples) into AI preferences."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

from .. import data
from ..cluster import ray_session
from ..cluster.group import ActorGroup
from ..config import Config, ConfigError, GroupConfig, ModelConfig
from ..labeler import FunctionBackend, GroupBackend, HTTPBackend, Labeler, gold_of, report
from ..labeler.templates import resolve_template
from ..tracking import Progress, write_summary
from ..workers.frozen import FrozenLMWorker
from .common import prepare_run_dir, recovering, role_group, say, stage_layout


@contextlib.contextmanager
def lm_group(role: str, model: ModelConfig, group: GroupConfig, chat: bool = True) -> Iterator[ActorGroup]:
    """A FrozenLMWorker group (scoring / sampling) for the duration of the block."""
    with role_group(role, FrozenLMWorker, group) as grp:
        info = grp.init_model(model.model_dump(), group.zero.model_dump(), chat)
        say(f"{role} ready: {model.name}, {info['params'] / 1e6:.1f}M parameters, {group.workers} worker(s), "
            f"{info['dtype']} ({info['dtype_reason']})")
        yield grp


@contextlib.contextmanager
def open_labeler(cfg: Config) -> Iterator[Labeler]:
    """The configured labeler, its backend started (an actor group for `hf`)."""
    lc = cfg.labeler
    b = lc.backend
    template = resolve_template(lc.template, lc.template_overrides)
    kw = dict(mode=lc.mode, swap=lc.swap, cot=lc.cot, self_consistency=lc.self_consistency,
              sc_temperature=lc.sc_temperature, cot_max_tokens=lc.cot_max_tokens, seed=lc.seed,
              relevance_weight=lc.pointwise_relevance, criteria=lc.criteria,
              criterion_weights=lc.criterion_weights, calibration=lc.calibration, length_coef=lc.length_coef,
              assist=lc.assist, chunk_words=lc.assist_chunk_words, assist_aggregate=lc.assist_aggregate,
              swap_combine=lc.swap_combine, temperature=lc.temperature, harm=lc.harm,
              refusal_bias=lc.refusal_bias, refusal_signal=lc.refusal_signal,
              exemplars=few_shot_exemplars(lc.few_shot_source, lc.few_shot, lc.seed) if lc.few_shot else None)
    try:
        probe = Labeler(FunctionBackend(lambda p, o: [0.0] * len(o)), template, **kw)
    except ValueError as exc:
        raise ConfigError(f"labeler: {exc}") from None
    del probe
    if b.type == "function":
        yield Labeler(FunctionBackend(b.function, b.generate_function), template, **kw)
    elif b.type == "http":
        yield Labeler(HTTPBackend(b.url, b.model_name, b.api_key_env, b.timeout_s, b.retries,
                                  b.top_logprobs, backoff_s=b.backoff_s), template, **kw)
    else:
        with lm_group("labeler", b.model or cfg.model, b.group, b.chat) as grp:
            yield Labeler(GroupBackend(grp, b.batch_size), template, **kw)


def plot_reliability(bins: list[dict], out: Path) -> Path:
    """Reliability diagram: per bin of P(response 1 preferred), how often it was (gold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="calibrated")
    ax.plot([b["mean_p"] for b in bins], [b["gold_rate"] for b in bins], marker="o", label="labeler")
    for b in bins:
        ax.annotate(str(b["n"]), (b["mean_p"], b["gold_rate"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set(xlabel="P(response 1 preferred), binned", ylabel="gold: response 1 preferred", xlim=(0, 1), ylim=(0, 1),
           title="labeler reliability (n per bin)")
    ax.legend(loc="upper left", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def few_shot_exemplars(source: str, k: int, seed: int = 0) -> list[dict]:
    """k judged exemplars from gold pairs, alternating a chosen and a rejected response, each
    from a different pair (a deterministic draw)."""
    import random

    rows = [r for r in data.load_rows(source, ["prompt", "response_1", "response_2"], None, seed)
            if gold_of(r, "gold") in (1, 2)]
    if len(rows) < k:
        raise ConfigError(f"labeler.few_shot: {k} exemplars asked for, {source} has {len(rows)} gold pairs")
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(rng.sample(rows, k)):
        g = gold_of(r, "gold")
        good = i % 2 == 0
        out.append({"context": r["prompt"], "response": r[f"response_{g if good else 3 - g}"], "good": good})
    return out


def load_pairs(cfg: Config) -> list[dict]:
    s = cfg.label
    fields = [s.prompt_field] if s.sample else [s.prompt_field, s.response_1_field, s.response_2_field]
    rows = data.load_rows(s.source, fields, s.max_samples, s.shuffle_seed)
    pairs = []
    for i, r in enumerate(rows):
        pair = {"id": i, "prompt": r[s.prompt_field]}
        if not s.sample:
            pair.update(response_1=r[s.response_1_field], response_2=r[s.response_2_field])
        if s.gold_field and s.gold_field in r:
            pair["gold"] = gold_of(r, s.gold_field)
        if "category" in r:
            pair["category"] = r["category"]
        pairs.append(pair)
    return pairs


def sample_responses(cfg: Config, pairs: list[dict]) -> None:
    """Two sampled responses per prompt from the policy model, in place, with progress."""
    sc = cfg.label.sample
    model = sc.model or cfg.model
    prompts = [p["prompt"] for p in pairs]
    from .sampling import sampling_group

    with sampling_group(cfg, "sampler", model, sc.group) as grp:
        step = sc.batch_size * grp.world_size
        bar = Progress(2 * len(prompts), "sample")
        out: list[list[str]] = [[], []]
        for k, seed in enumerate((sc.seed, sc.seed + 7919)):
            for i in range(0, len(prompts), step):
                part = prompts[i:i + step]
                got = grp.map("generate", part, sc.max_new_tokens, sc.temperature, seed + i, sc.batch_size)
                out[k].extend(got)
                bar.update(len(part))
        bar.close()
    for p, x, y in zip(pairs, out[0], out[1]):
        p["response_1"], p["response_2"] = x.strip(), y.strip()


def read_done(path: Path) -> dict[int, dict]:
    done: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash; it is labelled again
                done[rec["id"]] = rec
    return done


def run_label(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Sample (where configured) and label every pair; finished chunks are on disk, so a
    resumed or recovered run labels only the rest."""
    if cfg.label is None:
        raise ConfigError("this config has no `label` section")
    return recovering(cfg, "label", "label", lambda d, r: _run_label(cfg, d, r), run_dir, resume)


def _run_label(cfg: Config, run_dir: Path, resume: bool) -> dict[str, Any]:
    run_dir = prepare_run_dir(cfg, run_dir, "label", resume)
    out_path = run_dir / "labels.jsonl"
    samples_path = run_dir / "samples.jsonl"
    t0 = time.time()
    pairs = load_pairs(cfg)
    done = read_done(out_path) if resume else {}
    if not resume and out_path.exists():
        out_path.unlink()
    needs_ray = bool(cfg.label.sample) or cfg.labeler.backend.type == "hf"
    with ray_session(cfg.cluster) if needs_ray else contextlib.nullcontext():
        if cfg.label.sample:
            cached = read_done(samples_path) if resume else {}
            if len(cached) == len(pairs):
                pairs = [cached[p["id"]] for p in pairs]
            else:
                say(f"sampling two responses for {len(pairs)} prompts")
                with stage_layout(cfg, "sample"):
                    sample_responses(cfg, pairs)
                samples_path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        todo = [p for p in pairs if p["id"] not in done]
        say(f"{len(pairs)} pairs, {len(done)} already labelled, labeler {cfg.labeler.mode} "
            f"on {cfg.labeler.backend.type}")
        if todo:
            with stage_layout(cfg, "label"), open_labeler(cfg) as labeler, out_path.open("a") as fh:
                bar = Progress(len(pairs), "label", initial=len(done))
                step = cfg.label.chunk_size
                for i in range(0, len(todo), step):
                    chunk = todo[i:i + step]
                    recs = labeler.label([{"context": p["prompt"], "response_1": p["response_1"],
                                           "response_2": p["response_2"]} for p in chunk])
                    for p, r in zip(chunk, recs):
                        row = {**p, **r}
                        done[p["id"]] = row
                        fh.write(json.dumps(row) + "\n")
                    fh.flush()  # finished labels are on disk before the next chunk starts
                    bar.update(len(chunk))
                bar.close()
    records = [done[p["id"]] for p in pairs]
    rep = report(records, [p.get("gold") for p in pairs], [p.get("category") for p in pairs])
    if "agreement" in rep:
        lo, hi = rep["agreement_ci95"]
        cats = ", ".join(f"{c} {v['rate']:.0%} of {v['n']}" for c, v in rep.get("agreement_by_category", {}).items())
        lb = rep.get("length_bias")
        say(f"agreement with gold labels: {rep['agreement']:.1%} [95% CI {lo:.1%}, {hi:.1%}] on {rep['gold_pairs']} "
            f"pairs" + (f"; by category: {cats}" if cats else "")
            + (f"; prefers the longer response {lb['labeler_prefers_longer']:.0%} (gold {lb['gold_prefers_longer']:.0%})"
               if lb else "")
            + (f"; position bias {rep['position_bias_rate']:.0%}" if "position_bias_rate" in rep else ""))
    if "ece" in rep:
        say(f"soft labels: expected calibration error {rep['ece']:.3f} against gold "
            f"(reliability plot: {plot_reliability(rep['reliability'], run_dir / 'plots' / 'label_reliability.png')})")
    rep["wall_time_s"] = time.time() - t0
    rep["labels"] = str(out_path)
    rep["run_dir"] = str(run_dir)
    (run_dir / "label_report.json").write_text(json.dumps(rep, indent=1))
    write_summary(run_dir, {"label": rep}, cfg.name)
    return rep
