"""Distributed supervised fine-tuning: response-only cross-entropy on a policy group."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint, data, models
from ..cluster import ray_session
from ..config import Config, ConfigError, TrainConfig
from ..tracking import Progress, Tracker, plot_metrics, write_summary
from ..workers.policy import PolicyWorker
from .common import Cadence, checkpoint_root, recovering, plan_steps, prepare_run_dir, resume_point, role_group, say, stage_layout


def prepare_examples(cfg: Config) -> tuple[list[dict], list[dict], list[str]]:
    s = cfg.sft
    mcfg = cfg.sft_model()
    tok = models.load_tokenizer(models.resolve(mcfg.name, mcfg.seed, mcfg.overrides, say=say))
    rows = data.load_rows(s.data.source, [s.data.prompt_field, s.data.response_field],
                          s.data.max_samples, s.data.shuffle_seed)
    train_rows, eval_rows = data.split_eval(rows, s.data.eval_fraction)

    def enc(r):
        return data.encode_sft(tok, r[s.data.prompt_field], r[s.data.response_field], s.data.max_length)

    train = [e for e in map(enc, train_rows) if any(l != -100 for l in e["labels"][1:])]
    evals = [e for e in map(enc, eval_rows) if any(l != -100 for l in e["labels"][1:])]
    if len(train) < len(train_rows):
        say(f"{len(train_rows) - len(train)} examples lost their whole response to max_length "
            f"{s.data.max_length}; dropped")
    return train, evals, [r[s.data.prompt_field] for r in eval_rows]


def batch_for_step(examples: list[dict], step: int, batch_size: int, seed: int) -> list[dict]:
    """The global batch of optimizer step ``step``: a fixed function of (seed, step), so a
    resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = len(examples) // batch_size
    epoch, idx = divmod(step, per_epoch)
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [examples[i] for i in order[idx * batch_size:(idx + 1) * batch_size]]


def _eval(group, evals: list[dict]) -> float | None:
    if len(evals) < group.world_size:
        return None
    r = group.eval_nll(evals)
    return sum(r["nll_sum"]) / max(1, sum(r["tokens"]))


def run_sft(cfg: Config, run_dir: Path | None = None, resume: bool = False,
            samples: int = 3) -> dict[str, Any]:
    """Train, checkpoint, export. Returns the summary (also written to the run dir)."""
    if cfg.sft is None:
        raise ConfigError("this config has no `sft` section")
    return recovering(cfg, "sft", "sft", lambda d, r: _run_sft(cfg, d, r, samples), run_dir, resume)


def _run_sft(cfg: Config, run_dir: Path, resume: bool, samples: int) -> dict[str, Any]:
    s, mcfg = cfg.sft, cfg.sft_model()
    g, t = s.group, s.train
    plan_steps("sft", t.batch_size, g, t)  # the batch layout is checked before anything loads
    run_dir = prepare_run_dir(cfg, run_dir, "sft", resume)
    ckpt_root = checkpoint.join(checkpoint_root(cfg, run_dir), "sft")
    resume_from, start_step = resume_point(ckpt_root, resume)

    say(f"run directory: {run_dir}")
    train, evals, eval_prompts = prepare_examples(cfg)
    total = plan_steps("sft", len(train), g, t)
    say(f"{len(train)} train / {len(evals)} eval examples; {total} steps of {t.batch_size}; "
        f"{g.workers} worker(s), ZeRO-{g.zero.stage}" + (f"; resuming at step {start_step}" if resume_from else ""))

    tracker = Tracker(run_dir, cfg.tracking, cfg.model_dump(mode="json"), name=f"{cfg.name}-sft")
    summary: dict[str, Any] = {}
    t_start = time.time()
    with ray_session(cfg.cluster), stage_layout(cfg, "sft"), role_group("policy", PolicyWorker, g) as group:
        info = group.init_model(mcfg.model_dump(), g.zero.model_dump(), t.model_dump(), total,
                                str(resume_from) if resume_from else None)
        say(f"policy ready: {info['params'] / 1e6:.1f}M parameters, loaded in {info['load_s']:.1f}s")
        probe = eval_prompts[:samples]
        before = group.generate(probe, max_new_tokens=48) if probe and start_step == 0 else []
        eval0 = _eval(group, evals) if start_step == 0 else None
        if eval0 is not None:
            tracker.log("sft_eval", 0, {"eval_loss": eval0})
        bar = Progress(total, "sft", initial=start_step)
        losses, tokens_seen = run_steps(group, lambda step: batch_for_step(train, step, t.batch_size, t.seed),
                                        range(start_step, total), t, tracker, "sft", ckpt_root, total, evals, bar)
        bar.close()
        eval1 = _eval(group, evals)
        if eval1 is not None:
            tracker.log("sft_eval", total, {"eval_loss": eval1})
        ck = group.save_checkpoint(ckpt_root, total, {"step": total}, t.keep_checkpoints)
        final = run_dir / "final" / "sft"
        group.export_hf(str(final))
        after = group.generate(probe, max_new_tokens=48) if probe else []
        mem = group.memory()
        elapsed = time.time() - t_start
        summary = {
            "stage": "sft", "model": mcfg.name, "workers": g.workers, "zero_stage": g.zero.stage,
            "steps": total, "resumed_from_step": start_step if resume_from else None,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "eval_loss_before": eval0, "eval_loss_after": eval1,
            "response_tokens_per_s": tokens_seen / elapsed if elapsed else None,
            "wall_time_s": elapsed, "checkpoint": ck, "final_model": str(final),
            "per_rank_state_mb": [round(m["total"] / 2**20, 1) for m in mem],
            "samples": [{"prompt": p, "before": b, "after": a}
                        for p, b, a in zip(probe, before or [""] * len(probe), after)],
        }
    tracker.close()
    plot_metrics(run_dir, "sft", [["loss"], ["lr"], ["grad_norm"]], title=f"{cfg.name}: SFT")
    plot_metrics(run_dir, "sft_eval", [["eval_loss"]], title=f"{cfg.name}: SFT eval")
    write_summary(run_dir, {"sft": summary}, f"{cfg.name}")
    return summary


def run_steps(group, batch_of: Callable[[int], list[dict]], steps: range, t: TrainConfig, tracker: Tracker,
              stage: str, ckpt_root: str, total: int, evals: list[dict], bar: Progress,
              extra: dict[str, float] | None = None) -> tuple[list[float], int]:
    """Optimizer steps ``steps`` of response-only cross-entropy on a policy group: the
    batch of each step from ``batch_of(step)``, metrics under ``stage``, evaluation and
    checkpoints at the configured cadence (never at ``total``: the caller ends the run).
    Returns the losses and the target tokens seen."""
    losses: list[float] = []
    tokens_seen = 0
    saves = Cadence(t.save_every, t.save_minutes)
    for step in steps:
        batch = batch_of(step)
        r = group.train_step(batch, sum(data_targets(e) for e in batch))
        loss = sum(r["nll_sum"]) / max(1, sum(r["tokens"]))
        tokens_seen += sum(r["tokens"])
        losses.append(loss)
        metrics = {"loss": loss, "lr": r["lr"][0], "grad_norm": r["grad_norm"][0],
                   "step_time_s": max(r["time_s"]), "tokens": sum(r["tokens"])} | (extra or {})
        done = step + 1
        if t.eval_every and done % t.eval_every == 0 and done < total:
            ev = _eval(group, evals)
            if ev is not None:
                tracker.log(f"{stage}_eval", done, {"eval_loss": ev})
        tracker.log(stage, done, metrics)
        bar.update(1, loss=loss, lr=metrics["lr"])
        if saves.due(done, total):
            group.save_checkpoint(ckpt_root, done, {"step": done}, t.keep_checkpoints)
    return losses, tokens_seen


def data_targets(example: dict) -> int:
    return sum(1 for l in example["labels"][1:] if l != -100)
