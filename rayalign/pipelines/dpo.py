"""`rayalign dpo`: direct preference optimisation (DPO, or IPO) of the policy on preference
pairs against a frozen reference: no reward model, no sampling while it trains.

The reference's summed log-probs of every response are computed once, on the reference
group, before the first step (they never change); the policy group then trains on pairs
that carry them. Pairs come from the label stage's soft labels (in `rayalign run`) or any
pair file. The final policy gets the same held-out evaluation as PPO's: the labeler's win
rate against the starting model, rule-based refusal rates and the judge's agreement with
people.
"""
from __future__ import annotations

import contextlib
import random
import statistics
import time
from pathlib import Path
from typing import Any

from .. import checkpoint, data, models
from ..cluster import ray_session
from ..config import Config, ConfigError, RMDataConfig
from ..tracking import Progress, Tracker, plot_metrics, write_summary
from .common import (Cadence, checkpoint_root, plan_steps, prepare_run_dir, recovering, resume_point, role_group,
                     say, stage_layout)
from .sft import batch_for_step


def encode_pairs(d: RMDataConfig, tok) -> tuple[list[dict], list[dict], int]:
    """Training and held-out pairs in the policy's chat format: ``prompt_ids``, the two
    responses' ids (each closed by the end-of-turn token, as SFT trains them) and ``p`` =
    P(response_1 > response_2); and how many pairs were left out because the prompt alone
    fills ``max_length``."""
    if d.source is None:
        raise ConfigError("dpo.data.source is not set (only `rayalign run` fills it in, from its label stage)")
    rows, origin = data.read_rows(d.source)
    data.validate_rows(rows, [d.prompt_field, d.response_1_field, d.response_2_field], origin,
                       allow_empty=[d.response_1_field, d.response_2_field])
    pairs, skipped = [], 0
    for i, r in enumerate(rows, 1):
        if r.get(d.p_field) is None:
            raise data.DataError(f"{origin}: row {i}: missing preference field {d.p_field!r}")
        p = data.preference_p(r[d.p_field], origin, i)
        enc = [data.encode_sft(tok, r[d.prompt_field], r[k], d.max_length)
               for k in (d.response_1_field, d.response_2_field)]
        n_prompt = [sum(1 for x in e["labels"] if x == -100) for e in enc]
        if min(len(e["input_ids"]) - n for e, n in zip(enc, n_prompt)) < 1:
            skipped += 1  # truncation left no response token to compare
            continue
        pairs.append({"prompt_ids": enc[0]["input_ids"][:n_prompt[0]],
                      "ids_1": enc[0]["input_ids"][n_prompt[0]:], "ids_2": enc[1]["input_ids"][n_prompt[1]:],
                      "p": p})
    if not pairs:
        raise data.DataError(f"{origin}: no pair has a response token within max_length {d.max_length}")
    random.Random(d.shuffle_seed).shuffle(pairs)
    if d.max_samples:
        pairs = pairs[:d.max_samples]
    train, evals = data.split_eval(pairs, d.eval_fraction)
    return train, evals, skipped


def harden(pairs: list[dict]) -> tuple[list[dict], int]:
    """Soft labels as hard ones: p > ½ → 1, p < ½ → 0; ties left out (and counted)."""
    out = [dict(q, p=1.0 if q["p"] > 0.5 else 0.0) for q in pairs if q["p"] != 0.5]
    return out, len(pairs) - len(out)


def attach_reference(reference, pairs: list[dict]) -> None:
    """Each pair's ``ref_1``/``ref_2``: the reference's log-probs of its two responses,
    summed over their tokens (one pass over all pairs; they do not change while the policy
    trains)."""
    samples = [{"prompt_ids": q["prompt_ids"], "response_ids": q[k]} for q in pairs for k in ("ids_1", "ids_2")]
    lps = reference.map("token_logprobs", samples)
    if len(lps) != len(samples):
        raise RuntimeError(f"the reference answered {len(lps)} log-prob rows for {len(samples)} responses")
    for i, q in enumerate(pairs):
        q["ref_1"], q["ref_2"] = float(sum(lps[2 * i])), float(sum(lps[2 * i + 1]))


def pair_metrics(r: dict[str, list], prefix: str = "") -> dict[str, float]:
    """Means over pairs from a group's summed statistics."""
    n = max(1, sum(r["pairs"]))
    decided = max(1, sum(r["decided"]))
    return {f"{prefix}loss": sum(r["loss"]) / n,
            f"{prefix}reward_accuracy": sum(r["correct"]) / decided,
            f"{prefix}margin": sum(r["margin"]) / decided,
            f"{prefix}reward_chosen": sum(r["reward_chosen"]) / n,
            f"{prefix}reward_rejected": sum(r["reward_rejected"]) / n}


def evaluate_pairs(policy, evals: list[dict], loss) -> dict[str, float]:
    """Loss, implicit-reward accuracy and margin on held-out pairs."""
    if len(evals) < policy.world_size:
        return {}
    return pair_metrics(policy.dpo_eval(evals, loss.type, loss.beta, loss.tau), "eval_")


def run_dpo(cfg: Config, run_dir: Path | None = None, resume: bool = False,
            start_model: Path | None = None) -> dict[str, Any]:
    if cfg.dpo is None:
        raise ConfigError("this config has no `dpo` section")
    return recovering(cfg, "dpo", "dpo", lambda d, r: _run_dpo(cfg, d, r, start_model), run_dir, resume)


def _run_dpo(cfg: Config, run_dir: Path, resume: bool, start_model: Path | None) -> dict[str, Any]:
    from ..workers.frozen import FrozenLMWorker
    from ..workers.policy import PolicyWorker
    from .ppo import BaseOfPolicy, _maybe_labeler, evaluate_win_rate, policy_start, split_prompts

    d = cfg.dpo
    g, t, loss = d.policy.group, d.policy.train, d.loss
    plan_steps("dpo.policy", t.batch_size, g, t)
    pmodel = policy_start(cfg, start_model, d.policy.model)
    tok = models.load_tokenizer(models.resolve(pmodel.name, pmodel.seed, pmodel.overrides, say=say))
    train, evals, skipped = encode_pairs(d.data, tok)
    if loss.labels == "hard":
        train, ties = harden(train)
        say(f"hard labels: {ties} training pairs at p = 0.5 left out")
    total = plan_steps("dpo.policy", len(train), g, t)
    held, kinds = (split_prompts(d.prompts, "dpo.prompts")[1:]) if d.prompts is not None else ([], {})
    run_dir = prepare_run_dir(cfg, run_dir, "dpo", resume)
    ckpt_root = checkpoint.join(checkpoint_root(cfg, run_dir), "dpo")
    resume_from, start = resume_point(ckpt_root, resume)
    say(f"DPO ({loss.type}, beta {loss.beta}" + (f", tau {loss.tau}" if loss.type == "ipo" else "")
        + f"): {len(train)} train / {len(evals)} held-out pairs" + (f" ({skipped} too long, left out)" if skipped
                                                                     else "")
        + f", {total} steps, policy {pmodel.name} on {g.workers} worker(s) ZeRO-{g.zero.stage}"
        + (f"; resuming after step {start}" if resume_from else ""))
    tracker = Tracker(run_dir, cfg.tracking, cfg.model_dump(mode="json"), name=f"{cfg.name}-dpo")
    t0 = time.time()
    with ray_session(cfg.cluster), stage_layout(cfg, "dpo"), contextlib.ExitStack() as stack:
        policy = stack.enter_context(role_group("policy", PolicyWorker, g))
        info = policy.init_model(pmodel.model_dump(), g.zero.model_dump(), t.model_dump(), total,
                                 str(resume_from) if resume_from else None)
        say(f"policy ready: {info['params'] / 1e6:.1f}M parameters")
        if t.lora is not None:
            reference = BaseOfPolicy(policy)  # the starting model is the policy's base: one copy
        else:
            reference = stack.enter_context(role_group("reference", FrozenLMWorker, d.reference))
            reference.init_model(pmodel.model_dump(), d.reference.zero.model_dump(), True)
        tr = time.time()
        attach_reference(reference, train + evals)
        ref_s = time.time() - tr
        say(f"reference log-probs of {2 * (len(train) + len(evals))} responses in {ref_s:.0f}s")
        ev0 = evaluate_pairs(policy, evals, loss) if start == 0 else {}
        if ev0:
            tracker.log("dpo_eval", 0, ev0)
        bar = Progress(total, "dpo", initial=start)
        stack.callback(bar.close)
        saves = Cadence(t.save_every, t.save_minutes)
        rows: list[dict] = []
        for step in range(start, total):
            batch = batch_for_step(train, step, t.batch_size, t.seed)
            r = policy.dpo_update(batch, len(batch), loss.type, loss.beta, loss.tau)
            done = step + 1
            m = pair_metrics(r) | {"lr": r["lr"][0], "grad_norm": r["grad_norm"][0], "step_time_s": max(r["time_s"])}
            rows.append(m)
            tracker.log("dpo", done, m)
            bar.update(1, loss=m["loss"], acc=m["reward_accuracy"])
            if t.eval_every and done % t.eval_every == 0 and done < total:
                ev = evaluate_pairs(policy, evals, loss)
                if ev:
                    tracker.log("dpo_eval", done, ev)
            if saves.due(done, total):
                policy.save_checkpoint(ckpt_root, done, {"step": done}, t.keep_checkpoints)
        bar.close()
        ev1 = evaluate_pairs(policy, evals, loss)
        if ev1:
            tracker.log("dpo_eval", total, ev1)
        final = run_dir / "final" / "policy"
        policy.export_hf(str(final))
        ev: dict[str, Any] = {}
        if held and d.eval.win_rate:
            labeler = stack.enter_context(_maybe_labeler(cfg, True))
            ev = evaluate_win_rate(cfg, policy, reference, labeler, held, kinds, d.eval)
            tracker.log("dpo_heldout", total, {k: v for k, v in ev.items() if isinstance(v, (int, float))})
        mem = policy.memory()
    tracker.close()
    plot_metrics(run_dir, "dpo", [["loss"], ["reward_accuracy"], ["margin"], ["reward_chosen", "reward_rejected"]],
                 title=f"{cfg.name}: DPO ({loss.type})")
    plot_metrics(run_dir, "dpo_eval", [["eval_loss"], ["eval_reward_accuracy"], ["eval_margin"]],
                 title=f"{cfg.name}: DPO held-out pairs")
    summary = {
        "stage": "dpo", "loss_type": loss.type, "beta": loss.beta, "tau": loss.tau if loss.type == "ipo" else None,
        "labels": loss.labels,
        "policy_start": pmodel.name, "policy_workers": g.workers, "zero_stage": g.zero.stage, "steps": total,
        "resumed_from_step": start if resume_from else None,
        "train_pairs": len(train), "eval_pairs": len(evals), "pairs_too_long": skipped,
        "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": statistics.fmean(r["loss"] for r in rows[-3:]) if rows else None,
        "eval_loss_before": ev0.get("eval_loss"), "eval_loss": ev1.get("eval_loss"),
        "eval_reward_accuracy_before": ev0.get("eval_reward_accuracy"),
        "eval_reward_accuracy": ev1.get("eval_reward_accuracy"), "eval_margin": ev1.get("eval_margin"),
        "reference_logprobs_s": round(ref_s, 2), "wall_time_s": time.time() - t0, "final_model": str(final),
        "per_rank_state_mb": [round(x["total"] / 2**20, 1) for x in mem], **ev,
    }
    write_summary(run_dir, {"dpo": summary}, cfg.name)
    return summary
