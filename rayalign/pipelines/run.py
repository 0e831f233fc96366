"""`rayalign run`: the whole RLAIF pipeline as stages of one run directory.

SFT → two sampled responses per prompt from the SFT policy → AI labels → reward model
on the soft labels → PPO from the SFT policy against that reward model; or, with a `dpo`
section instead of `rm` and `ppo`, DPO from the SFT policy on the AI labels. Each stage's
output is the next one's input; a stage whose output exists is skipped, so a stopped run
continues where it stopped (`--resume RUN_DIR`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, ModelConfig
from ..tracking import new_run_dir
from .common import say

STAGES = ("sft", "label", "rm", "ppo", "dpo")


def stage_done(run_dir: Path, stage: str) -> bool:
    return {
        "sft": (run_dir / "final" / "sft" / "config.json").is_file(),
        "label": (run_dir / "label_report.json").is_file(),
        "rm": (run_dir / "final" / "rm" / "config.json").is_file(),
        "ppo": (run_dir / "final" / "policy" / "config.json").is_file()
        and "ppo" in _read_summary(run_dir),
        "dpo": (run_dir / "final" / "policy" / "config.json").is_file()
        and "dpo" in _read_summary(run_dir),
    }[stage]


def _read_summary(run_dir: Path) -> dict:
    p = run_dir / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def wire(cfg: Config, run_dir: Path) -> Config:
    """Point each stage at the outputs of the ones before it (where the config leaves it open)."""
    cfg = cfg.model_copy(deep=True)
    sft_out = run_dir / "final" / "sft"
    if cfg.label is not None and cfg.label.sample is not None and cfg.label.sample.model is None and cfg.sft:
        cfg.label.sample.model = ModelConfig(name=str(sft_out), dtype=cfg.model.dtype)
    if cfg.rm is not None and cfg.rm.data.source is None:
        if cfg.label is None:
            raise ConfigError("rm.data.source is not set and the config has no label stage to take pairs from")
        cfg.rm.data.source = str(run_dir / "labels.jsonl")
    if cfg.dpo is not None and cfg.dpo.data.source is None:
        if cfg.label is None:
            raise ConfigError("dpo.data.source is not set and the config has no label stage to take pairs from")
        cfg.dpo.data.source = str(run_dir / "labels.jsonl")
    return cfg


def run_pipeline(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    from .dpo import run_dpo
    from .label import run_label
    from .ppo import run_ppo
    from .rm import run_rm
    from .sft import run_sft

    stages = [s for s in STAGES if getattr(cfg, s) is not None]
    if not stages:
        raise ConfigError("the config defines no pipeline stage (sft, label, rm, ppo, dpo)")
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg, "run")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = wire(cfg, run_dir)
    say(f"run directory: {run_dir}; stages: {' → '.join(stages)}")
    from ..models import prepare_all

    prepare_all(cfg.model_dump(), say=say)
    times: dict[str, float] = {}
    for stage in stages:
        if stage_done(run_dir, stage):
            say(f"{stage}: output exists; stage skipped")
            continue
        say(f"===== stage {stage} =====")
        t = time.time()
        if stage == "sft":
            run_sft(cfg, run_dir=run_dir, resume=resume)
        elif stage == "label":
            run_label(cfg, run_dir=run_dir, resume=resume)
        elif stage == "rm":
            run_rm(cfg, run_dir=run_dir, resume=resume)
        elif stage == "dpo":
            sft_out = run_dir / "final" / "sft"
            run_dpo(cfg, run_dir=run_dir, resume=resume,
                    start_model=sft_out if (sft_out / "config.json").is_file() else None)
        else:
            sft_out = run_dir / "final" / "sft"
            rm_out = run_dir / "final" / "rm"
            run_ppo(cfg, run_dir=run_dir, resume=resume,
                    start_model=sft_out if (sft_out / "config.json").is_file() else None,
                    default_rm=rm_out if (rm_out / "config.json").is_file() else None)
        times[stage] = time.time() - t
        resume = True  # later stages of this run continue whatever a stopped earlier run left
    headline = headline_table(run_dir, times)
    (run_dir / "README.md").write_text(headline)
    return {"run_dir": str(run_dir), "table": headline}


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def heldout_rows(p: dict, name: str) -> list[tuple[str, str]]:
    """The held-out evaluation's rows (refusal rates, win rate, judge agreement) of a
    trained policy's summary, with a plain verdict on each."""
    f = _f
    rows: list[tuple[str, str]] = []
    for key, what in (("refusal_rate_harmful", "refusal rate on held-out harmful questions (rule-based)"),
                      ("answer_rate_benign", "answer rate on held-out benign questions (rule-based)")):
        r = p.get(key)
        if r:
            ch = r["change"]
            lo, hi = ch["ci95"]
            verdict = ("improved" if lo > 0 else "got worse" if hi < 0 else "no significant change") \
                if key == "refusal_rate_harmful" else \
                ("rose" if lo > 0 else "FELL (over-refusal)" if hi < 0 else "no significant change")
            rows.append((what, f"SFT {r['start']['rate']:.0%} → {name} {r['final']['rate']:.0%} of "
                               f"{r['final']['n']}; change {ch['difference']:+.0%} [95% CI {lo:+.0%}, {hi:+.0%}]: "
                               f"{verdict}"))
    if p.get("win_rate_vs_start") is not None:
        ci = p.get("win_rate_ci95") or [None, None]
        verdict = ("better" if ci[0] is not None and ci[0] > 0.5 else
                   "worse" if ci[1] is not None and ci[1] < 0.5 else "not distinguishable from 50%")
        rows.append((f"win rate of the {name} policy vs the SFT policy (AI judge, held-out prompts)",
                     f"{f(p['win_rate_vs_start'], '{:.0%}')} [95% CI {f(ci[0], '{:.0%}')}, {f(ci[1], '{:.0%}')}] "
                     f"of {p.get('win_rate_prompts') or p.get('eval_prompts')} ({p.get('identical_answers')} identical): {verdict}"))
        if p.get("judge_agreement_not_measured"):
            rows.append(("judge agreement with people", f"not measured: {p['judge_agreement_not_measured']}"))
        if p.get("judge_agreement") is not None:
            jc = p.get("judge_agreement_ci95") or [None, None]
            rows.append((f"judge agreement with people ({p.get('judge_gold_source')})",
                         f"{f(p.get('judge_agreement'), '{:.0%}')} [95% CI {f(jc[0], '{:.0%}')}, "
                         f"{f(jc[1], '{:.0%}')}] on {p.get('judge_gold_pairs')} pairs ({p.get('judge')})"))
    return rows


def headline_table(run_dir: Path, times: dict[str, float]) -> str:
    """The few figures that say whether the run worked, as a markdown table."""
    s = _read_summary(run_dir)
    rows: list[tuple[str, str]] = []

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    if "sft" in s:
        rows.append(("SFT eval loss (before → after)",
                     f"{f(s['sft'].get('eval_loss_before'))} → {f(s['sft'].get('eval_loss_after'))}"))
    if "label" in s:
        lab = s["label"]
        dist = lab.get("label_distribution", {})
        rows.append(("AI labels", f"{lab.get('pairs')} pairs by {lab.get('labeler')}; "
                                  f"confident {f(dist.get('confident_share'), '{:.0%}')}"))
    if "rm" in s:
        rows.append(("reward model held-out accuracy (before → after)",
                     f"{f(s['rm'].get('eval_accuracy_before'))} → {f(s['rm'].get('eval_accuracy'))}"))
    if "ppo" in s:
        p = s["ppo"]
        rows.append(("PPO reward (first → last 3 iterations)",
                     f"{f(p.get('reward_first'))} → {f(p.get('reward_last3_mean'))}"))
        rows.append(("PPO KL to reference (last / max, nats per sequence)",
                     f"{f(p.get('kl_last'))} / {f(p.get('kl_max'))}"))
        fu = p.get("first_update") or {}
        epochs = sorted(int(k.rsplit("epoch", 1)[1]) for k in fu if k.startswith("approx_kl_epoch"))
        if epochs:
            rows.append((f"first update approx KL / clipfrac, epochs {'/'.join(map(str, epochs))}",
                         " / ".join(f(fu.get(f"approx_kl_epoch{e}"), "{:.4f}") for e in epochs) + " ; "
                         + " / ".join(f(fu.get(f"clipfrac_epoch{e}"), "{:.3f}") for e in epochs)))
        rows.append(("PPO seconds per iteration (generate / score / train)",
                     f"{f(p.get('mean_generate_s'), '{:.1f}')} / {f(p.get('mean_score_s'), '{:.1f}')} / "
                     f"{f(p.get('mean_train_s'), '{:.1f}')}"))
        curve = p.get("heldout_reward_curve") or []
        if len(curve) >= 2:
            rows.append((f"held-out reward, {len(curve)} evaluations on fixed prompts (iteration: reward)",
                         " → ".join(f"{it}: {v:.3f}" for it, v in curve)))
            verdict = "rose" if curve[-1][1] > curve[0][1] else "did NOT rise"
            rows.append(("held-out reward, start → end", f"{f(curve[0][1])} → {f(curve[-1][1])} ({verdict})"))
        rows += heldout_rows(p, "PPO")
    if "dpo" in s:
        d = s["dpo"]
        strength = f"tau {d.get('tau')}" if d.get("loss_type") == "ipo" else f"beta {d.get('beta')}"
        rows.append((f"DPO loss ({d.get('loss_type')}, {strength}), first step → last 3 steps",
                     f"{f(d.get('first_loss'))} → {f(d.get('last_loss'))}"))
        acc0, acc1, n = d.get("eval_reward_accuracy_before"), d.get("eval_reward_accuracy"), d.get("eval_pairs")
        if acc0 is not None and acc1 is not None and n:
            from ..algos.stats import wilson_interval

            lo, hi = wilson_interval(acc1 * n, n)
            verdict = "rose" if acc0 < lo else "FELL" if acc0 > hi else "no measurable change"
            rows.append((f"DPO implicit-reward accuracy on {n} held-out AI-labelled pairs (before → after)",
                         f"{f(acc0)} → {f(acc1)} [95% CI {lo:.2f}, {hi:.2f}]: {verdict}"))
        rows += heldout_rows(d, "DPO")
    for stage, secs in times.items():
        rows.append((f"{stage} wall time", f"{secs / 60:.1f} min"))
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    return "\n".join([f"# {run_dir.name}", ""] + lines + ["", "Plots: " + ", ".join(f"plots/{x}" for x in plots), ""])
