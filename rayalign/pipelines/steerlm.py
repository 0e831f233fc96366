"""`rayalign steerlm annotate|train|generate`: SteerLM (Dong et al. 2023).

annotate: label a few hundred (prompt, response) rows per attribute (the AI labeler's
  expected 0–4 rating or its P(good), data fields where the rows have them, or a rule where
  the attribute is measurable: verbosity by word count), train the attribute-prediction model (one
  regression head per attribute, on the reward role) on them, score it on held-out labelled
  rows, and annotate every row of the SFT data with its predicted levels (a measured
  attribute is measured on every row) (``attributes.jsonl``).
train: attribute-conditioned SFT, each prompt carrying its attribute string, then measure
  steerability on held-out prompts: the answers' length at verbosity 0–4 (it should rise
  with the level) and the labeler's judgement of answers at low and high helpfulness.
generate: answer a prompt at given attribute levels.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from .. import checkpoint, data, models
from ..algos.stats import mean_interval, spearman
from ..cluster import ray_session
from ..config import Config, ConfigError, DataConfig, ModelConfig, SFTConfig, ZeroConfig
from ..steerlm import (controlled, instructed_levels, level, parse_attributes, quantile_levels, render_attributes,
                       steer_prompt, word_levels)
from ..tracking import Progress, Tracker, plot_metrics, write_summary
from .common import Cadence, checkpoint_root, plan_steps, prepare_run_dir, recovering, resume_point, role_group, say

ANNOTATED = "attributes.jsonl"
ANSWERS = "steerability_answers.json"


def _section(cfg: Config):
    if cfg.steerlm is None:
        raise ConfigError("this config has no `steerlm` section")
    return cfg.steerlm


# ---------------------------------------------------------------- annotate

def seed_labels(cfg: Config, labeler, rows: list[dict] | None = None
                ) -> tuple[list[tuple[str, str]], dict[str, list[float]], dict[str, str]]:
    """The rows the predictor learns from, as (prompt, response), their value per attribute,
    and where each attribute's values came from. Without ``steerlm.labels.source``: the
    first ``labels.max_samples`` of ``rows`` (the rows being annotated, sampled answers
    among them), else of steerlm.data."""
    s = cfg.steerlm
    lab = s.labels
    if lab.source:
        rows = data.load_rows(lab.source, [lab.prompt_field, lab.response_field], lab.max_samples,
                              s.data.shuffle_seed)
        items = [(str(r[lab.prompt_field]), str(r[lab.response_field])) for r in rows]
    else:
        rows = (rows if rows is not None else data_rows(cfg)[0])[:lab.max_samples]
        items = [(r["prompt"], r["response"]) for r in rows]
    values: dict[str, list[float]] = {}
    origin: dict[str, str] = {}
    for a in s.attributes:
        if a in lab.rules:
            values[a] = [float(x) for x in word_levels([r for _, r in items])[0]]
            origin[a] = f"rule:{lab.rules[a]}"
        elif lab.source and all(r.get(a) is not None for r in rows):
            values[a] = [float(r[a]) for r in rows]
            bad = [v for v in values[a] if not 0 <= v <= 4]
            if bad:
                raise data.DataError(f"{lab.source}: attribute {a} has values outside 0-4: {bad[:3]}")
            origin[a] = f"data:{lab.source}"
        else:
            if labeler is None:
                raise ConfigError(f"attribute {a} needs the labeler (no rule, no data field)")
            if lab.judged.get(a, "rating") == "p_good":
                say(f"labeler judges {a} of {len(items)} responses by its P(good)")
                # on the 0-4 scale, so that `labels.scale: absolute` reads it like a rating
                values[a] = [4.0 * p for p in labeler.p_good(items)]
                origin[a] = f"labeler:p_good:{labeler.tag}"
            else:
                say(f"labeler rates {a} of {len(items)} responses")
                values[a] = labeler.attribute_scores(items, a)
                origin[a] = f"labeler:{labeler.tag}"
    return items, values, origin


def data_rows(cfg: Config) -> tuple[list[dict], int]:
    """steerlm.data as ``{prompt, response, origin: data}`` rows without repeats, and how
    many repeated rows were dropped."""
    d = cfg.steerlm.data
    raw = data.load_rows(d.source, [d.prompt_field, d.response_field], d.max_samples, d.shuffle_seed)
    rows = data.dedupe([{"prompt": str(r[d.prompt_field]), "response": str(r[d.response_field]), "origin": "data"}
                        for r in raw], ["prompt", "response"])
    return rows, len(raw) - len(rows)


def with_samples(rows: list[dict], answers: dict[str, list[dict]], keep_unfinished: bool = False
                 ) -> tuple[list[dict], dict[str, int]]:
    """``rows`` with the sampled answers to each prompt placed after the prompt's first row
    (so any prefix of the result mixes the data's answers and the samples); empty, repeated
    and (unless kept) unfinished answers dropped."""
    extra: dict[str, list[dict]] = {}
    counts = {"drawn": 0, "unfinished": 0, "empty": 0}
    for p, outs in answers.items():
        for o in outs:
            counts["drawn"] += 1
            text = o["response"].strip()
            if not text:
                counts["empty"] += 1
            elif not o["ended"] and not keep_unfinished:
                counts["unfinished"] += 1
            else:
                extra.setdefault(p, []).append({"prompt": p, "response": text, "origin": "sampled",
                                                **({"instructed": o["instructed"]} if o.get("instructed") else {})})
    out, placed = [], set()
    for r in rows:
        out.append(r)
        if r["prompt"] not in placed:
            placed.add(r["prompt"])
            out += extra.get(r["prompt"], [])
    merged = data.dedupe(out, ["prompt", "response"])
    counts["kept"] = sum(r["origin"] == "sampled" for r in merged)
    return merged, counts


def sample_answers(cfg: Config, prompts: list[str]) -> dict[str, list[dict]]:
    """``steerlm.samples.per_prompt`` answers of the policy's starting model to each prompt,
    each ``{response, ended}``."""
    from .sampling import sampling_group

    s = cfg.steerlm
    sc = s.samples
    model = s.policy.model or cfg.model
    out: dict[str, list[dict]] = {p: [] for p in prompts}
    names = list(sc.instructed)
    with sampling_group(cfg, "steerlm_samples", model, sc.group) as grp:
        for k in range(sc.per_prompt):
            asked = [instructed_levels(sc.instructed, i, k) for i in range(len(prompts))]
            texts = [steer_prompt(p, a, names, "words") if a else p for p, a in zip(prompts, asked)]
            say(f"sampling answer {k + 1} of {sc.per_prompt} to {len(prompts)} prompts ({model.name}, "
                f"temperature {sc.temperature}" + (f", instructed: {', '.join(names)}" if names else "") + ")")
            got = grp.map("generate", texts, sc.max_new_tokens, sc.temperature, sc.seed + k, 16, True)
            for p, a, g in zip(prompts, asked, got):
                out[p].append({**g, "instructed": a} if a else g)
    return out


def by_instruction(rows: list[dict], values: dict[str, list[float]]) -> dict[str, dict[str, dict]]:
    """For each instructed attribute: the mean of each attribute's ``values`` over the rows
    sampled at each instructed level, with an interval (what the instruction did to the
    labels or annotations; the instruction itself is never a label)."""
    at: dict[str, dict[int, list[int]]] = {}
    for i, r in enumerate(rows):
        for a, v in (r.get("instructed") or {}).items():
            at.setdefault(a, {}).setdefault(v, []).append(i)
    return {a: {str(v): {b: mean_interval([float(xs[i]) for i in idx]) for b, xs in values.items()}
                for v, idx in sorted(per.items())} for a, per in at.items()}


def scaled(values: dict[str, list[float]], origin: dict[str, str], scale: str) -> dict[str, list[float]]:
    """The labeler's ratings as levels (``quantiles``: among the labelled rows' quintiles);
    rules and data fields as they are."""
    if scale == "absolute":
        return values
    return {a: [float(x) for x in quantile_levels(v)[0]] if origin[a].startswith("labeler:") else v
            for a, v in values.items()}


def run_annotate(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    _section(cfg)
    return recovering(cfg, "steerlm_annotate", "steerlm annotate", lambda d, r: _annotate(cfg, d, r), run_dir,
                      resume)


def _annotate(cfg: Config, run_dir: Path, resume: bool) -> dict[str, Any]:
    from ..workers.reward import AttributeWorker
    from .label import open_labeler

    s = cfg.steerlm
    names = list(s.attributes)
    pr = s.predictor
    mcfg = pr.model or cfg.rm_model()
    run_dir = prepare_run_dir(cfg, run_dir, "steerlm", resume)
    ckpt_root = checkpoint.join(checkpoint_root(cfg, run_dir), "attributes")
    resume_from, start = resume_point(ckpt_root, resume)
    rows, repeats = data_rows(cfg)
    if repeats:
        say(f"{s.data.source}: {repeats} repeated (prompt, response) rows dropped, {len(rows)} left")
    tok = models.load_tokenizer(models.resolve(mcfg.name, mcfg.seed, mcfg.overrides, say=say))
    tracker = Tracker(run_dir, cfg.tracking, cfg.model_dump(mode="json"), name=f"{cfg.name}-steerlm-annotate")
    t0 = time.time()
    need_labeler = any(a not in s.labels.rules for a in names)
    saved = run_dir / "attribute_labels.json"
    sampled = run_dir / "samples.json"
    counts: dict[str, int] = {}
    with ray_session(cfg.cluster):
        if s.samples.per_prompt:
            if resume and sampled.is_file():
                answers = json.loads(sampled.read_text())
                say(f"sampled answers from {sampled}")
            else:
                answers = sample_answers(cfg, list(dict.fromkeys(r["prompt"] for r in rows)))
                sampled.write_text(json.dumps(answers))
            rows, counts = with_samples(rows, answers, s.samples.keep_unfinished)
            say(f"{counts['kept']} of {counts['drawn']} sampled answers kept ({counts['unfinished']} cut by "
                f"max_new_tokens, {counts['empty']} empty)")
        if resume and saved.is_file():
            # The labeler's ratings are the slow part: a resumed run keeps them.
            got = json.loads(saved.read_text())
            items, values, origin = [tuple(x) for x in got["items"]], got["values"], got["origin"]
            say(f"attribute labels of {len(items)} rows from {saved}")
        else:
            if need_labeler:
                with open_labeler(cfg) as labeler:
                    items, values, origin = seed_labels(cfg, labeler, rows)
            else:
                items, values, origin = seed_labels(cfg, None, rows)
            saved.write_text(json.dumps({"items": items, "values": values, "origin": origin}))
        raw = values
        control = {}
        for a, c in s.labels.control.items():
            values = dict(values)
            values[a], means = controlled(values[a], [int(x) for x in values[c]])
            control[a] = {"by": c, "mean_at_level": {str(k): v for k, v in means.items()}}
            say(f"{a} labels less their mean at each {c} level: "
                + ", ".join(f"{k}: {v:.2f}" for k, v in means.items()))
            origin[a] += f"|less:{c}"
        values = scaled(values, origin, s.labels.scale)
        enc = [{"ids": data.encode_rm(tok, q, r, pr.data.max_length), "y": [values[a][i] for a in names]}
               for i, (q, r) in enumerate(items)]
        train, held = data.split_eval(enc, s.labels.eval_fraction)
        g, t = pr.group, pr.train
        total = plan_steps("steerlm.predictor", len(train), g, t)
        say(f"attribute predictor {mcfg.name}: {len(train)} labelled rows ({len(held)} held out), {total} steps; "
            + ", ".join(f"{a} from {origin[a]}" for a in names))
        with role_group("attributes", AttributeWorker, g) as grp:
            grp.set_attributes(names)
            grp.init_model(mcfg.model_dump(), g.zero.model_dump(), t.model_dump(), total,
                           str(resume_from) if resume_from else None)
            from .sft import batch_for_step

            bar = Progress(total, "attribute predictor", initial=start)
            saves = Cadence(t.save_every, t.save_minutes)
            for step in range(start, total):
                batch = batch_for_step(train, step, t.batch_size, t.seed)
                r = grp.attribute_step(batch, sum(v is not None for b in batch for v in b["y"]))
                mse = sum(r["sse"]) / max(1, sum(r["labels"]))
                tracker.log("steerlm_predictor", step + 1, {"mse": mse, "lr": r["lr"][0],
                                                            "grad_norm": r["grad_norm"][0]})
                bar.update(1, mse=mse)
                if saves.due(step + 1, total):
                    grp.save_checkpoint(ckpt_root, step + 1, {"step": step + 1}, t.keep_checkpoints)
            bar.close()
            quality = predictor_quality(grp.map("predict", [h["ids"] for h in held]), held, train, names)
            tracker.log("steerlm_predictor_eval", total, {f"{a}_{k}": v for a, q in quality.items()
                                                          for k, v in q.items() if isinstance(v, float)})
            final = run_dir / "final" / "attributes"
            grp.export_hf(str(final))
            say(f"annotating {len(rows)} rows of {s.data.source}")
            preds = grp.map("predict", [data.encode_rm(tok, r["prompt"], r["response"], pr.data.max_length)
                                        for r in rows])
    # Quantile-scaled attributes are annotated by the predictions' own quintiles: a regression
    # pulls its predictions toward the mean, and rounded they would leave the top level empty.
    # A measured attribute is measured on every row (on the labelled rows' scale), not predicted.
    responses = [r["response"] for r in rows]
    cuts = word_levels([r for _, r in items])[1]
    levels = {a: word_levels(responses, cuts)[0] if origin[a] == "rule:words"
              else quantile_levels([p[i] for p in preds])[0]
              if s.labels.scale == "quantiles" and origin[a].startswith("labeler:")
              else [level(p[i]) for p in preds] for i, a in enumerate(names)}
    out = run_dir / ANNOTATED
    with out.open("w") as fh:
        for j, (r, p) in enumerate(zip(rows, preds)):
            fh.write(json.dumps({"prompt": r["prompt"], "response": r["response"], "origin": r["origin"],
                                 **({"instructed": r["instructed"]} if r.get("instructed") else {}),
                                 "attributes": {a: levels[a][j] for a in names},
                                 "predicted": {a: round(v, 3) for a, v in zip(names, p)}}) + "\n")
    tracker.close()
    plot_metrics(run_dir, "steerlm_predictor", [["mse"], ["lr"]], title=f"{cfg.name}: attribute predictor")
    dist = {a: {str(v): levels[a].count(v) for v in range(5)} for a in names}
    # the labelled rows are the first of `rows` (unless labels.source names others)
    labelled = rows[:len(items)]
    if [(r["prompt"], r["response"]) for r in labelled] != [tuple(x) for x in items]:
        labelled = []
    summary = {"stage": "steerlm_annotate", "attributes": names, "label_origin": origin,
               "label_scale": s.labels.scale,
               "rated_range": {a: [min(v), max(v)] for a, v in raw.items() if origin[a].startswith("labeler:")},
               "labelled_rows": len(items), "repeated_rows_dropped": repeats,
               "sampled_answers": counts or None,
               "mean_words": {o: statistics.fmean(len(r["response"].split()) for r in rows if r["origin"] == o)
                              for o in ("data", "sampled") if any(r["origin"] == o for r in rows)},
               "by_instruction": {"labels": by_instruction(labelled, raw),
                                  "annotated": by_instruction(rows, {a: levels[a] for a in names})}
               if s.samples.instructed else None,
               "label_control": control or None,
               # how far the annotated attributes say the same thing (ρ of the predictions)
               "predicted_spearman": {a: {b: spearman([p[i] for p in preds], [p[j] for p in preds])
                                          for j, b in enumerate(names) if j > i} for i, a in enumerate(names)},
               "predictor": mcfg.name, "predictor_steps": total,
               "predictor_heldout": quality, "annotated_rows": len(rows), "annotated": str(out),
               "level_distribution": dist, "final_model": str(final), "wall_time_s": time.time() - t0}
    write_summary(run_dir, {"steerlm_annotate": summary}, cfg.name)
    return summary


def predictor_quality(pred: list[list[float]], held: list[dict], train: list[dict], names: list[str]) -> dict:
    """Per attribute on held-out labelled rows: mean absolute error of the predictor and of
    always predicting the training mean (the baseline it must beat), and Spearman's rank
    correlation with the labels."""
    out: dict[str, dict] = {}
    for i, a in enumerate(names):
        pairs = [(p[i], h["y"][i]) for p, h in zip(pred, held) if h["y"][i] is not None]
        if len(pairs) < 2:
            continue
        base = statistics.fmean(t["y"][i] for t in train if t["y"][i] is not None)
        mae = statistics.fmean(abs(p - y) for p, y in pairs)
        mae0 = statistics.fmean(abs(base - y) for _, y in pairs)
        out[a] = {"mae": mae, "mae_of_mean": mae0, "spearman": spearman([p for p, _ in pairs], [y for _, y in pairs]),
                  "n": len(pairs), "beats_the_mean": mae < mae0}
    return out


# ---------------------------------------------------------------- train

def conditioned_rows(rows: list[dict], names: list[str], style: str) -> list[dict]:
    return [{"prompt": steer_prompt(r["prompt"], r["attributes"], names, style), "response": r["response"]}
            for r in rows]


def run_train(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Attribute-conditioned SFT (the SFT stage on conditioned rows), then the steerability
    evaluation on held-out prompts."""
    from .sft import run_sft

    s = _section(cfg)
    run_dir = Path(run_dir) if run_dir else prepare_run_dir(cfg, None, "steerlm", resume)
    src = Path(s.annotated) if s.annotated else run_dir / ANNOTATED
    if not src.is_file():
        raise ConfigError(f"no annotated rows at {src}: run `rayalign steerlm annotate` with this run directory "
                          "first, or set steerlm.annotated")
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    bad = [i for i, r in enumerate(rows, 1) if set(r.get("attributes", {})) != set(s.attributes)]
    if bad:
        raise data.DataError(f"{src}: rows {bad[:5]} do not carry exactly the attributes {s.attributes}")
    train, held = data.split_by_prompt(rows, s.data.eval_fraction)
    if s.eval.source:
        train_prompts = {r["prompt"] for r in train}
        got = data.load_rows(s.eval.source, [s.eval.prompt_field])
        held = [p for p in dict.fromkeys(str(r[s.eval.prompt_field]) for r in got) if p not in train_prompts]
        if len(held) < s.eval.prompts:
            raise ConfigError(f"steerlm.eval.prompts ({s.eval.prompts}) exceeds the {len(held)} distinct prompts of "
                              f"{s.eval.source} that are not trained on")
    elif len(held) < s.eval.prompts:
        raise ConfigError(f"steerlm.eval.prompts ({s.eval.prompts}) exceeds the {len(held)} held-out prompts "
                          "(steerlm.data.eval_fraction of the distinct prompts)")
    run_dir.mkdir(parents=True, exist_ok=True)
    cond = run_dir / "steerlm_sft.jsonl"
    cond.write_text("".join(json.dumps(r) + "\n" for r in conditioned_rows(train, list(s.attributes), s.render)))
    sft_cfg = cfg.model_copy(deep=True)
    sft_cfg.sft = SFTConfig(data=DataConfig(source=str(cond), max_length=s.data.max_length, eval_fraction=0.05,
                                            shuffle_seed=s.data.shuffle_seed),
                            group=s.policy.group, train=s.policy.train, model=s.policy.model or cfg.model)
    say(f"attribute-conditioned SFT on {len(train)} rows; {len(held)} prompts held out for steerability")
    try:
        sft = run_sft(sft_cfg, run_dir=run_dir, resume=resume) \
            if not (run_dir / "final" / "sft" / "config.json").is_file() else {"skipped": "final/sft exists"}
    except ConfigError as exc:
        raise ConfigError(f"steerlm train: {exc} (the conditioned SFT runs as an sft stage: its keys are "
                          "steerlm.policy.group/train and steerlm.data)") from None
    prompts = held[:s.eval.prompts]
    trained = ModelConfig(name=str(run_dir / "final" / "sft"), dtype=cfg.model.dtype)
    # the starting policy on the same conditioned prompts: what the SFT added to the words
    ev, *before = steerability(cfg, [trained] + ([s.policy.model or cfg.model] if s.eval.baseline else []), prompts)
    # every answer, for audit: the summary keeps the figures and one example
    (run_dir / ANSWERS).write_text(json.dumps({"prompts": prompts, "models": [
        {"model": x["model"], **x.pop("answers")} for x in [ev] + before]}, indent=1))
    if before:
        ev["before_sft"] = before[0]
    summary = {"stage": "steerlm", "trained_rows": len(train),
               "trained_sampled_rows": sum(r.get("origin") == "sampled" for r in train),
               "heldout_prompts": s.eval.prompts, "heldout_source": s.eval.source or f"{s.data.source} (held out)",
               "sft_eval_loss": sft.get("eval_loss_after"), **ev}
    write_summary(run_dir, {"steerlm": summary}, cfg.name)
    (run_dir / "steerability.md").write_text(steerability_table(summary))
    return summary


def steerability(cfg: Config, models: list[ModelConfig], prompts: list[str]) -> list[dict[str, Any]]:
    """For each model: greedy answers to held-out prompts at verbosity 0–4 (other attributes
    at their base levels): mean length in words per level with its interval, Spearman's
    correlation of level and length, and whether the means rise at every step; then answers
    at low and high helpfulness, judged by the labeler (pointwise P(good)), their paired
    difference. One Ray session and one labeler serve every model."""
    from .label import lm_group, open_labeler

    s = cfg.steerlm
    e = s.eval
    names = list(s.attributes)
    lo, hi = e.helpfulness_levels
    outs: list[dict[str, Any]] = []
    helps: list[dict[int, list[str]]] = []
    with ray_session(cfg.cluster):
        # Inference only: the policy's layout, every rank a whole copy.
        layout = s.policy.group.model_copy(update={"zero": ZeroConfig()})
        for mc in models:
            with lm_group("steered", mc, layout) as grp:
                def answers(levels: dict[str, int]) -> list[str]:
                    texts = [steer_prompt(q, levels, names, s.render) for q in prompts]
                    return [x.strip() for x in grp.map("generate", texts, e.max_new_tokens, 0.0)]

                per_level = {}
                for v in range(5):
                    say(f"steerability of {mc.name}: verbosity {v}")
                    per_level[v] = answers(dict(e.base, verbosity=v))
                helps.append({lo: answers(dict(e.base, helpfulness=lo)), hi: answers(dict(e.base, helpfulness=hi))}
                             if "helpfulness" in names else {})
            lengths = {v: [len(a.split()) for a in xs] for v, xs in per_level.items()}
            means = {v: mean_interval([float(x) for x in ls]) for v, ls in lengths.items()}
            steps = [means[v + 1]["mean"] - means[v]["mean"] for v in range(4)]
            outs.append({"model": mc.name, "verbosity_length": {str(v): means[v] for v in means},
                         "verbosity_spearman": spearman([float(v) for v in lengths for _ in lengths[v]],
                                                        [float(x) for v in lengths for x in lengths[v]]),
                         "verbosity_monotonic": all(d > 0 for d in steps),
                         "verbosity_examples": [{"prompt": prompts[0],
                                                 **{str(v): per_level[v][0][:200] for v in per_level}}],
                         "answers": {"verbosity": {str(v): xs for v, xs in per_level.items()}}})
        if any(helps):
            with open_labeler(cfg) as lab:
                for out, h in zip(outs, helps):
                    p_lo = lab.p_good(list(zip(prompts, h[lo])))
                    p_hi = lab.p_good(list(zip(prompts, h[hi])))
                    out["answers"]["helpfulness"] = {str(v): [{"answer": a, "p_good": p} for a, p in zip(h[v], ps)]
                                                     for v, ps in ((lo, p_lo), (hi, p_hi))}
                    out["helpfulness_judged"] = {
                        "levels": [lo, hi], "p_good_low": statistics.fmean(p_lo), "p_good_high": statistics.fmean(p_hi),
                        "difference": mean_interval([b - a for a, b in zip(p_lo, p_hi)]),
                        "identical_answers": sum(a == b for a, b in zip(h[lo], h[hi])), "judge": lab.tag}
    return outs


def steerability_table(s: dict[str, Any]) -> str:
    """What the steerability evaluation found, in plain words (and the starting policy's,
    on the same prompts, where it was measured)."""
    b = s.get("before_sft")
    lines = ["# Steerability", "", f"{s['heldout_prompts']} held-out prompts ({s.get('heldout_source', '?')}), "
             "greedy answers, after the attribute-conditioned SFT"
             + (" and (last columns) before it, on the same conditioned prompts." if b else "."), "",
             "| verbosity | mean words | 95% CI |" + (" before SFT | 95% CI |" if b else ""),
             "|---:|---:|---|" + ("---:|---|" if b else "")]
    for v, m in s["verbosity_length"].items():
        row = f"| {v} | {m['mean']:.1f} | [{m['ci95'][0]:.1f}, {m['ci95'][1]:.1f}] |"
        if b:
            mb = b["verbosity_length"][v]
            row += f" {mb['mean']:.1f} | [{mb['ci95'][0]:.1f}, {mb['ci95'][1]:.1f}] |"
        lines.append(row)
    for tag, x in [("After SFT", s)] + ([("Before SFT", b)] if b else []):
        lines += ["", f"{tag}: Spearman's rho (level, length) {x['verbosity_spearman']:.2f}; the mean length "
                  + ("rises at every level." if x["verbosity_monotonic"] else "does NOT rise at every level.")]
    for tag, x in [("After SFT", s)] + ([("Before SFT", b)] if b else []):
        h = x.get("helpfulness_judged")
        if not h:
            continue
        d = h["difference"]
        lo, hi = d["ci95"]
        verdict = ("moved the judge's score up" if lo > 0 else "moved it DOWN" if hi < 0
                   else "did not move it measurably")
        lines += ["", f"{tag}, helpfulness {h['levels'][1]} vs {h['levels'][0]}: the labeler's P(good) "
                  f"{h['p_good_high']:.3f} vs {h['p_good_low']:.3f}, paired difference {d['mean']:+.3f} "
                  f"[95% CI {lo:+.3f}, {hi:+.3f}] ({h['identical_answers']} identical answers): raising "
                  f"helpfulness {verdict} ({h['judge']})."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- generate

def generate(cfg: Config, run_dir: Path, prompts: list[str], attributes: str, max_new_tokens: int = 128) -> list[str]:
    """Answers from the run's attribute-conditioned policy at the given levels (the rest at
    ``steerlm.eval.base``), in this process."""
    import torch

    from ..data import chat_prompt

    s = _section(cfg)
    levels = parse_attributes(attributes, s.attributes, s.eval.base)
    d = Path(run_dir) / "final" / "sft"
    if not (d / "config.json").is_file():
        raise ConfigError(f"no attribute-conditioned policy at {d}: run `rayalign steerlm train` first")
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer(d)
    model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)
    model.eval()
    out = []
    for q in prompts:
        ids = tok(chat_prompt(tok, steer_prompt(q, levels, s.attributes, s.render)), return_tensors="pt",
                  add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    say(f"attributes: {render_attributes(levels, s.attributes, s.render)}")
    return out
