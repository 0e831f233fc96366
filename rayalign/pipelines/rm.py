"""`rayalign rm`: reward-model training on (soft) preferences on a sharded reward group."""
from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

from .. import checkpoint, data, models
from ..cluster import ray_session
from ..config import Config, ConfigError
from ..tracking import Progress, Tracker, plot_metrics, write_summary
from ..workers.reward import RewardWorker
from .common import Cadence, checkpoint_root, recovering, plan_steps, prepare_run_dir, resume_point, role_group, say, stage_layout
from .sft import batch_for_step



def encode_pairs(cfg: Config) -> tuple[list[dict], list[dict]]:
    d = cfg.rm.data
    if d.source is None:
        raise ConfigError("rm.data.source is not set (only `rayalign run` fills it in, from its label stage)")
    mcfg = cfg.rm_model()
    tok = models.load_tokenizer(models.resolve(mcfg.name, mcfg.seed, mcfg.overrides, say=say))
    rows, origin = data.read_rows(d.source)
    # A sampled response may be empty (the policy stopped at once): a poor answer, still a preference.
    data.validate_rows(rows, [d.prompt_field, d.response_1_field, d.response_2_field], origin,
                       allow_empty=[d.response_1_field, d.response_2_field])
    pairs = []
    for i, r in enumerate(rows, 1):
        if d.p_field not in r or r[d.p_field] is None:
            raise data.DataError(f"{origin}: row {i}: missing preference field {d.p_field!r}")
        p = data.preference_p(r[d.p_field], origin, i)
        pairs.append({
            "ids_1": data.encode_rm(tok, r[d.prompt_field], r[d.response_1_field], d.max_length),
            "ids_2": data.encode_rm(tok, r[d.prompt_field], r[d.response_2_field], d.max_length),
            "p": p, "margin": float(r.get("margin", 0.0) or 0.0),
        })
    if not pairs:
        raise data.DataError(f"{origin}: no pairs")
    random.Random(d.shuffle_seed).shuffle(pairs)
    if d.max_samples:
        pairs = pairs[:d.max_samples]
    return data.split_eval(pairs, d.eval_fraction)


def evaluate(group, pairs: list[dict]) -> dict[str, float]:
    if len(pairs) < group.world_size:
        return {}
    r = group.score_pairs(pairs)
    decided = [(a, b, p["p"]) for a, b, p in zip(r["r1"], r["r2"], pairs) if p["p"] != 0.5]
    acc = sum((a > b) == (p > 0.5) for a, b, p in decided) / max(1, len(decided))
    return {"eval_accuracy": acc, "eval_pairs": len(decided),
            "eval_margin": statistics.fmean(a - b if p > 0.5 else b - a for a, b, p in decided) if decided else 0.0}


def run_rm(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    if cfg.rm is None:
        raise ConfigError("this config has no `rm` section")
    return recovering(cfg, "rm", "rm", lambda d, r: _run_rm(cfg, d, r), run_dir, resume)


def _run_rm(cfg: Config, run_dir: Path, resume: bool) -> dict[str, Any]:
    rm, mcfg = cfg.rm, cfg.rm_model()
    g, t = rm.group, rm.train
    plan_steps("rm", t.batch_size, g, t)
    run_dir = prepare_run_dir(cfg, run_dir, "rm", resume)
    ckpt_root = checkpoint.join(checkpoint_root(cfg, run_dir), "rm")
    resume_from, start = resume_point(ckpt_root, resume)

    train, evals = encode_pairs(cfg)
    total = plan_steps("rm", len(train), g, t)
    say(f"reward model {mcfg.name}: {len(train)} train / {len(evals)} eval pairs, {total} steps, "
        f"{g.workers} worker(s), ZeRO-{g.zero.stage}, loss {rm.loss.type}")
    tracker = Tracker(run_dir, cfg.tracking, cfg.model_dump(mode="json"), name=f"{cfg.name}-rm")
    t0 = time.time()
    summary: dict[str, Any] = {}
    with ray_session(cfg.cluster), stage_layout(cfg, "rm"), role_group("reward", RewardWorker, g) as group:
        group.init_model(mcfg.model_dump(), g.zero.model_dump(), t.model_dump(), total,
                         str(resume_from) if resume_from else None)
        group.set_loss(rm.loss.model_dump())
        ev0 = evaluate(group, evals) if start == 0 else {}
        if ev0:
            tracker.log("rm_eval", 0, ev0)
        bar = Progress(total, "rm", initial=start)
        losses = []
        saves = Cadence(t.save_every, t.save_minutes)
        for step in range(start, total):
            batch = batch_for_step(train, step, t.batch_size, t.seed)
            r = group.train_step(batch, len(batch))
            loss = sum(r["loss_sum"]) / sum(r["pairs"])
            acc = sum(r["correct"]) / max(1, sum(r["counted"]))
            losses.append(loss)
            done = step + 1
            tracker.log("rm", done, {"loss": loss, "train_accuracy": acc, "lr": r["lr"][0],
                                     "grad_norm": r["grad_norm"][0], "step_time_s": max(r["time_s"])})
            bar.update(1, loss=loss, acc=acc)
            if t.eval_every and done % t.eval_every == 0 and done < total:
                ev = evaluate(group, evals)
                if ev:
                    tracker.log("rm_eval", done, ev)
            if saves.due(done, total):
                group.save_checkpoint(ckpt_root, done, {"step": done}, t.keep_checkpoints)
        bar.close()
        ev1 = evaluate(group, evals)
        if ev1:
            tracker.log("rm_eval", total, ev1)
        # Normalisation statistics for PPO: scores of the training responses.
        probe = train[: min(len(train), 256)]
        sc = group.score_pairs(probe)
        scores = sc["r1"] + sc["r2"]
        mean, std = statistics.fmean(scores), statistics.pstdev(scores) or 1.0
        group.set_stats(mean, std)
        ck = group.save_checkpoint(ckpt_root, total, {"step": total}, t.keep_checkpoints)
        final = run_dir / "final" / "rm"
        group.export_hf(str(final))
        summary = {
            "stage": "rm", "model": mcfg.name, "workers": g.workers, "zero_stage": g.zero.stage,
            "loss_type": rm.loss.type, "steps": total, "train_pairs": len(train), "eval_pairs": len(evals),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "eval_accuracy_before": ev0.get("eval_accuracy"), "eval_accuracy": ev1.get("eval_accuracy"),
            "score_mean": mean, "score_std": std, "wall_time_s": time.time() - t0,
            "checkpoint": ck, "final_model": str(final),
        }
    tracker.close()
    plot_metrics(run_dir, "rm", [["loss"], ["train_accuracy"], ["lr"]], title=f"{cfg.name}: reward model")
    plot_metrics(run_dir, "rm_eval", [["eval_accuracy"], ["eval_margin"]], title=f"{cfg.name}: RM eval")
    write_summary(run_dir, {"rm": summary}, cfg.name)
    return summary
