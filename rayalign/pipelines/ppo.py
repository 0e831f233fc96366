"""PPO with a KL penalty to a frozen reference, over any set of groups.

``ppo_iteration`` is one rollout → score → advantages → update cycle and reads like
single-process code; where each role runs (actor groups on Ray, or in process) is the
groups' business. ``run_ppo`` is the ``rayalign ppo`` command around it: prompts, roles,
reward sources, checkpoints and resume, metrics, export and the final evaluation.
"""
from __future__ import annotations

import contextlib
import json
import random
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .. import checkpoint, data
from ..algos import ppo
from ..cluster import ray_session
from ..cluster.group import ActorGroup, lost_actor
from ..config import Config, ConfigError, ModelConfig
from ..tracking import Progress, Tracker, plot_metrics, write_summary
from .common import Cadence, checkpoint_root, failure_limit, prepare_run_dir, record_placement, role_group, say, stage_layout

if TYPE_CHECKING:
    from ..batch import Rows

# (prompts, samples) -> one score per sample; a sample carries "response" (text) and
# "response_ids", so a verifiable reward can read either.
ScoreFn = Callable[[list[str], list[dict]], list[float]]


def ppo_iteration(policy, reference, critic, reward_fn: ScoreFn, prompts: "list[str] | Rows", *,
                  temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 32,
                  kl_coef: float = 0.05, kl_estimator: str = "k1", estimator: str = "gae",
                  samples_per_prompt: int = 1, gamma: float = 1.0, lam: float = 0.95, clip: float = 0.2,
                  value_clip: float = 0.2, entropy_coef: float = 0.0, epochs: int = 1,
                  minibatches: int = 1, missing_eos_penalty: float | None = None,
                  reward_clip: float | None = None, logprobs_from_rollout: bool = True,
                  rollout_batch_size: int = 16, min_new_tokens: int = 0, overlap: str = "shared_cores",
                  defer_critic: bool = False, critic_backlog: list | None = None,
                  seed: int = 0, sampler=None, tis_cap: float | None = None, clip_high: float | None = None,
                  kl_in_loss: bool = False, loss_agg: str = "token_mean", dynamic_sampling: bool = False,
                  max_sampling_rounds: int = 3, more_prompts: Callable[[int], Any] | None = None,
                  overlong_buffer: int | None = None, overlong_penalty: float = 1.0) -> dict[str, Any]:
    """One PPO iteration. ``reward_fn(prompts, samples)`` gives one score per sample (the
    combined reward sources). Returns metrics, a few example samples (``examples``) and the
    iteration's training batch as a :class:`~rayalign.batch.Rows` handle (``batch``).

    The data stays off the driver: ``prompts`` (a list, or Rows of a ``prompt`` column
    already repeated ``samples_per_prompt`` times) go to the sampler, whose samples stay in
    the object store; the reference, critic and policy read them there; scoring and the
    advantage math run in tasks beside them; the updates select their minibatch rows from
    (seed, epoch). The driver passes handles and reads metrics.

    ``overlap``: roles that do not depend on each other run at the same time. ``separate``
    (roles on their own nodes or GPUs): reference, critic and reward scoring overlap, and
    so do the policy and critic updates of each minibatch. ``shared_cores`` (roles packed
    on the same CPUs): only the two updates overlap, each rank on its share of the
    threads. ``off``: every call in turn.

    ``sampler``: where rollouts come from (:class:`~rayalign.pipelines.sampling.Sampler`;
    default the policy's own workers); its weight syncs are the ``sync_s`` phase.
    ``tis_cap``: truncated importance weights against the engine's log-probs.

    GRPO and its variants: ``kl_in_loss`` moves the KL to the reference from the
    reward into the policy loss (β·k per token, k3 with ``kl_estimator="k3"``);
    ``loss_agg`` is how per-token terms become the loss (token_mean, GRPO's
    seq_mean_token_mean, Dr. GRPO's seq_mean_token_sum_norm over ``max_new_tokens``);
    ``clip_high`` is DAPO's ε_high. ``dynamic_sampling`` (DAPO) keeps only groups whose
    rewards differ: up to ``max_sampling_rounds`` rounds, each on ``more_prompts(round)``
    (prompts, each repeated ``samples_per_prompt`` times), until the batch has as many
    groups as the first round; short of that, the batch is filled with groups of equal
    rewards (their advantage is 0: only the KL term moves them). ``overlong_buffer``:
    DAPO's soft length penalty over the last that many tokens of the budget.
    """
    from ..batch import Batch, Rows, column, put, task
    from ..cluster.group import ActorGroup

    if overlap not in ("shared_cores", "separate", "off"):
        raise ValueError(f"overlap must be shared_cores, separate or off, not {overlap!r}")
    if estimator == "gae" and critic is None:
        raise ValueError("estimator gae needs a critic")
    if dynamic_sampling and (estimator == "gae" or samples_per_prompt < 2):
        raise ValueError("dynamic sampling needs a group estimator and samples_per_prompt >= 2")
    times: dict[str, float] = {}
    def as_rows(prompts):
        if isinstance(prompts, Rows):
            return prompts
        # A prompt's samples stay adjacent (the per-prompt baselines rely on it).
        batch = [p for p in prompts for _ in range(samples_per_prompt)]
        return put(Batch({"prompt": column("prompt", batch)}), isinstance(policy, ActorGroup))

    prompts = as_rows(prompts)
    remote = prompts.remote
    engines = sampler is not None and sampler.engines is not None

    if engines:
        t = time.time()
        sampler.ensure_synced()  # the weights of the last update, before this rollout
        times["sync_s"] = time.time() - t
    t = time.time()
    backlog_in = list(critic_backlog or [])
    with _overlapped([policy, critic] if backlog_in and overlap != "off" else [], overlap):
        # Submitted after the cores are shared: an actor runs its calls in order.
        pending = [critic.submit("value_update", part, tokens, value_clip) for part, tokens in backlog_in]
        if pending and overlap == "off":
            for p in pending:
                p.result()
        samples = (sampler or policy).rollout(prompts, max_new_tokens, temperature, top_p, seed, rollout_batch_size,
                                              min_new_tokens)
        critic_stats = _critic_stats([p.result() for p in pending])
    sampled: dict[str, float] = {}
    scores = None
    if dynamic_sampling:
        samples, scores, sampled = _dynamic_sampling(
            sampler or policy, samples, reward_fn, samples_per_prompt, max_sampling_rounds,
            lambda r: as_rows(more_prompts(r)) if more_prompts else None,
            (max_new_tokens, temperature, top_p, seed, rollout_batch_size, min_new_tokens), remote)
    times["generate_s"] = time.time() - t

    t = time.time()
    have_engine_lp = "rollout_logprobs" in samples.complete
    old = None
    if not (logprobs_from_rollout and have_engine_lp):
        old = policy.token_logprobs(samples, temperature)
    gae_on = estimator == "gae"
    # Scoring forwards overlap only where roles have their own cores: on shared cores two
    # threads on one forward beat one thread each on two (measured: benchmarks/README.md).
    go = overlap == "separate"
    ref_f = reference.submit("token_logprobs", samples, temperature) if go else None
    val_f = critic.submit("values", samples) if gae_on and go else None
    if scores is None:
        score_meta, scores = task(score_samples, samples, reward_fn, remote=remote)
    else:
        score_meta = {"terms": sampled.pop("terms")}
    ref_lp = ref_f.result() if ref_f else reference.token_logprobs(samples, temperature)
    values = (val_f.result() if val_f else critic.values(samples)) if gae_on else None
    settings = dict(kl_coef=kl_coef, kl_estimator=kl_estimator, estimator=estimator,
                    samples_per_prompt=samples_per_prompt, gamma=gamma, lam=lam,
                    missing_eos_penalty=missing_eos_penalty, reward_clip=reward_clip,
                    drift=engines and have_engine_lp and old is not None, tis_cap=tis_cap,
                    version=sampler.version if engines else None,
                    epochs=epochs, minibatches=minibatches, seed=seed, kl_in_loss=kl_in_loss,
                    max_new_tokens=max_new_tokens, overlong_buffer=overlong_buffer,
                    overlong_penalty=overlong_penalty)
    info, train = task(advantages, samples, old, ref_lp, values, scores, settings, remote=remote)
    times["score_s"] = time.time() - t

    t = time.time()
    n = info["rows"]
    if n % minibatches:
        raise ValueError(f"{n} samples do not split into {minibatches} minibatches")
    mbs = n // minibatches
    stats: dict[str, float] = {}
    backlog: list | None = [] if gae_on and defer_critic else None
    now = gae_on and not defer_critic
    with _overlapped([policy, critic] if now else [], overlap):
        pkw = dict(clip_high=clip_high, kl_coef=kl_coef if kl_in_loss else 0.0, kl_estimator=kl_estimator,
                   loss_agg=loss_agg, norm_len=max_new_tokens)
        _updates(policy, critic if now else None, train, info["minibatch_tokens"], epochs, minibatches, mbs, clip,
                 value_clip, temperature, entropy_coef, seed, overlap, stats, backlog, pkw)
    times["train_s"] = time.time() - t
    out = {
        **info["metrics"], **score_meta["terms"], "kl_coef": kl_coef,
        "policy_loss": stats[f"loss_epoch{epochs}"], "clipfrac": stats[f"clipfrac_epoch{epochs}"],
        "approx_kl": stats[f"approx_kl_epoch{epochs}"], "entropy": stats[f"entropy_epoch{epochs}"],
        **{k: v for k, v in stats.items() if "_epoch" in k},
        "grad_norm": stats["grad_norm"], **sampled,
    }
    if kl_in_loss:
        out["kl_loss"] = stats[f"kl_loss_epoch{epochs}"]
    if dynamic_sampling:
        # The kept batch leaves out groups that all failed or all passed: its mean is not the
        # policy's reward. reward_mean is the first round's, over every sample drawn.
        out["batch_reward_mean"] = out["reward_mean"]
        out["reward_mean"] = out.pop("sampled_reward_mean")
    if now:
        out["value_loss"] = stats["value_loss"]
        out["vf_clipfrac"] = stats["vf_clipfrac"]
    elif critic_stats:
        out.update(critic_stats)
    if backlog is not None:
        out["critic_backlog"] = backlog
    out.update(times)
    out["iteration_s"] = sum(times.values())
    out["batch_nbytes"] = info["nbytes"]
    out["examples"] = info["examples"]
    out["batch"] = train
    return out


def score_samples(samples, reward_fn: ScoreFn, group_size: int | None = None):
    """The reward of each sample (a task beside the reference and critic forwards): a
    ``score`` column, and each reward term's mean where the reward is a mix; with
    ``group_size``, which groups' rewards differ (``varied``) and the mean score."""
    from ..batch import Batch, BatchError, column, meta_of

    rows = samples.load().to_rows(["prompt", "prompt_ids", "response_ids", "response", "ended"])
    scores = reward_fn([r["prompt"] for r in rows], rows)
    if len(scores) != len(rows):
        raise BatchError(f"the reward gave {len(scores)} scores for {len(rows)} samples")
    out = Batch({"score": column("score", [float(x) for x in scores])})
    extra = {}
    if group_size:
        sc = torch.tensor([float(x) for x in scores])
        extra = {"varied": ppo.varied_groups(sc, group_size).tolist(), "mean": float(sc.mean())}
    return meta_of(out, terms=dict(getattr(reward_fn, "last_terms", None) or {}), **extra), out


def _dynamic_sampling(sampler, samples, reward_fn, group_size: int, rounds: int, more, sample_args, remote: bool):
    """DAPO's dynamic sampling: score the first round, and while fewer groups than it holds
    have rewards that differ, sample another round of prompts (``more(round)``). Returns the
    kept samples (with their ``score``), the same handle as scores, and metrics."""
    from ..batch import task

    metas, parts = [], []
    need = None
    max_new, temperature, top_p, seed, batch_size, min_new = sample_args
    for r in range(rounds):
        if r:
            prompts = more(r)
            if prompts is None:
                break
            samples = sampler.rollout(prompts, max_new, temperature, top_p, seed + 7919 * r, batch_size, min_new)
        meta, scores = task(score_samples, samples, reward_fn, group_size, remote=remote)
        metas.append(meta)
        parts.append((samples, scores))
        need = need or len(meta["varied"])
        if sum(sum(m["varied"]) for m in metas) >= need:
            break
    meta, kept = task(select_groups, parts, group_size, need, remote=remote)
    first = metas[0]
    return kept, kept, {"terms": dict(first["terms"]), "sampled_reward_mean": first["mean"],
                        "sampling_rounds": len(metas), "varied_group_share": meta["varied_share"],
                        "varied_groups_first_round": sum(first["varied"]) / len(first["varied"])}


def select_groups(parts, group_size: int, need: int):
    """``need`` groups out of rounds of (samples, scores): those whose rewards differ
    first, in sampling order, then (if too few) groups of equal rewards; a task."""
    from ..batch import Batch, meta_of

    batches, varied, equal = [], [], []
    for samples, scores in parts:
        b = samples.load()
        sc = scores.load().columns["score"]
        b = b.with_columns({"score": sc})
        flags = ppo.varied_groups(torch.from_numpy(sc.copy()), group_size).tolist()
        for g, f in enumerate(flags):
            (varied if f else equal).append((len(batches), g))
        batches.append(b)
    chosen = (varied + equal)[:need]
    chosen.sort()  # in sampling order
    out = Batch.concat([batches[i].take(np.arange(g * group_size, (g + 1) * group_size)) for i, g in chosen])
    return meta_of(out, varied_share=min(len(varied), need) / need), out


def minibatch(rows, seed: int, epoch: int, j: int, size: int, shuffle: bool):
    """Minibatch ``j`` of ``epoch``: a fixed shuffle per (seed, epoch), so resumed runs see
    the same minibatches."""
    base = rows.shuffled(seed * 7919 + epoch) if shuffle else rows
    return base.take(j * size, (j + 1) * size)


def advantages(samples, old, ref, values, scores, s: dict):
    """Rewards, KL and advantages of an iteration's samples (a task off the driver): the
    training batch (samples plus ``old_logprobs``, ``advantages``, and for GAE
    ``old_values``/``returns``) and the iteration's metrics."""
    from ..batch import Ragged, Rows, frame, meta_of, unframe
    from ..rollout import WeightVersionError

    b = samples.load()
    if s["version"] is not None:
        got = set(b.get("weight_version"))
        if got != {s["version"]}:
            raise WeightVersionError(f"rollouts sampled with weight version(s) {sorted(got)}, the policy is at "
                                     f"{s['version']}")
    lens = b.columns["response_ids"].lengths
    width = int(lens.max())
    engine_lp = b.columns.get("rollout_logprobs")
    old_col = old.load().columns["logprobs"] if old is not None else Ragged(engine_lp.values, engine_lp.offsets)
    logp, mask = frame(old_col, width)
    metrics: dict[str, Any] = {}
    is_w = None
    if s["drift"]:
        el, _ = frame(engine_lp, width)
        metrics.update(ppo.logprob_drift(logp, el, mask))
        if s["tis_cap"] is not None:
            is_w = ppo.truncated_is_weights(logp, el, s["tis_cap"]) * mask
            metrics["tis_weight_mean"] = float(is_w.sum() / mask.sum())
    ref_lp, _ = frame(ref.load().columns["logprobs"], width)
    raw = torch.from_numpy(scores.load().columns["score"].copy())
    sc = raw
    if s["missing_eos_penalty"] is not None:
        sc = ppo.eos_penalty(sc, torch.from_numpy(b.columns["ended"].copy()), s["missing_eos_penalty"])
    if s["overlong_buffer"]:
        sc = sc + ppo.overlong_penalty(torch.from_numpy(lens.copy()), s["max_new_tokens"], s["overlong_buffer"],
                                       s["overlong_penalty"])
    if s["reward_clip"] is not None:
        sc = sc.clamp(-s["reward_clip"], s["reward_clip"])
    kl = ppo.kl_estimate(logp, ref_lp, s["kl_estimator"]) * mask
    cols: dict[str, Any] = {"old_logprobs": old_col}
    # GRPO: the KL is a loss term the policy computes from the reference's log-probs.
    beta = 0.0 if s["kl_in_loss"] else s["kl_coef"]
    if s["kl_in_loss"]:
        cols["ref_logprobs"] = unframe(ref_lp, lens)
    if s["estimator"] == "gae":
        v, _ = frame(values.load().columns["values"], width)
        rewards = ppo.token_rewards(sc, kl, mask, beta)
        adv, returns = ppo.gae(rewards, v, mask, s["gamma"], s["lam"])
        adv = ppo.masked_whiten(adv, mask)
        cols["old_values"] = unframe(v, lens)
        cols["returns"] = unframe(returns, lens)
    else:
        # Critic-free: the KL penalty folds into the sequence reward, the baseline is per batch
        # (reinforce) or per prompt (rloo, group_norm); every token shares its sequence's advantage.
        seq = sc - beta * kl.sum(1)
        adv = ppo.sequence_baselines(seq, s["samples_per_prompt"], s["estimator"])[:, None] * mask
        # group_norm is already on a unit scale per group; group_mean (Dr. GRPO) is left
        # unscaled on purpose.
        if s["estimator"] not in ("group_norm", "group_mean"):
            # Whitened like GAE's: the step size then does not depend on the reward's scale
            # (as in REINFORCE++ and RLOO's normalised advantages).
            adv = ppo.masked_whiten(adv, mask)
    cols["advantages"] = unframe(adv, lens)
    if is_w is not None:
        cols["is_weights"] = unframe(is_w, lens)
    train = b.with_columns(cols)
    n, mbs = len(train), len(train) // s["minibatches"]
    whole = Rows(((train, n),))
    tokens = [[int(lens[minibatch(whole, s["seed"], e, j, mbs, s["minibatches"] > 1).indices()].sum())
               for j in range(s["minibatches"])] for e in range(s["epochs"])]
    ended = b.columns["ended"]
    metrics.update({
        "reward_mean": float(raw.mean()), "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
        "score_mean": float(sc.mean()), "kl": float(kl.sum(1).mean()),
        "response_length": float(mask.sum(1).mean()), "ended_rate": float(ended.mean()),
    })
    # The first samples (a whole prompt's group where groups hold 4 or more) with their rewards
    # and advantages: what the policy is being paid for, readable.
    k = min(max(4, s["samples_per_prompt"]), n)
    examples = [{"prompt": r["prompt"], "prompt_tokens": len(r["prompt_ids"]), "response": r["response"],
                 "ended": r["ended"], "reward": float(raw[i]), "advantage": float(adv[i][mask[i] > 0][0])
                 if mask[i].any() else 0.0}
                for i, r in enumerate(b.take(range(k)).to_rows(["prompt", "prompt_ids", "response", "ended"]))]
    return meta_of(train, metrics=metrics, minibatch_tokens=tokens, examples=examples), train


@contextlib.contextmanager
def _overlapped(groups: list, overlap: str):
    """Split the cores among roles that run at once (``shared_cores``), then give each
    its own threads back."""
    from ..cluster.group import ActorGroup

    groups = [g for g in groups if isinstance(g, ActorGroup)]  # in process, calls run in turn anyway
    if overlap != "shared_cores" or len(groups) < 2:
        yield
        return
    for g in groups:
        g.share_cores(len(groups))
    try:
        yield
    finally:
        for g in groups:
            g.share_cores(1)


def _critic_stats(results: list[dict]) -> dict[str, float]:
    """Token-weighted mean value loss and clip fraction over finished critic updates."""
    if not results:
        return {}
    n = sum(sum(r["tokens"]) for r in results)
    return {"value_loss": sum(sum(r["value_loss"]) for r in results) / n,
            "vf_clipfrac": sum(sum(r["vf_clipfrac"]) for r in results) / n}


def flush_critic(critic, backlog: list | None, value_clip: float = 0.2) -> dict[str, float]:
    """Run deferred critic updates now (in order); their loss statistics."""
    return _critic_stats([critic.value_update(part, tokens, value_clip) for part, tokens in backlog or []])


def _updates(policy, critic, train, tokens, epochs, minibatches, mbs, clip, value_clip, temperature, entropy_coef,
             seed, overlap, stats, backlog=None, pkw: dict | None = None) -> None:
    """PPO epochs x minibatches of policy (and critic) steps; the critic's step runs beside
    the policy's. ``tokens[epoch][j]``: the response tokens of each minibatch; ``pkw``: the
    policy loss's GRPO/DAPO settings."""
    for epoch in range(epochs):
        for j in range(minibatches):
            part = minibatch(train, seed, epoch, j, mbs, minibatches > 1)
            n_tok = tokens[epoch][j]
            if backlog is not None:
                backlog.append((part, n_tok))
            pending = critic.submit("value_update", part, n_tok, value_clip) \
                if critic is not None and overlap != "off" else None
            pkw = pkw or {}
            # The policy loss divides by the minibatch's tokens, or its sequences (GRPO's
            # per-answer means); the critic's value loss is always a token mean.
            count = n_tok if pkw.get("loss_agg", "token_mean") == "token_mean" else mbs
            r = policy.ppo_update(part, count, clip, temperature, entropy_coef, **pkw)
            n = sum(r["tokens"])
            for k in ("loss", "clipfrac", "approx_kl", "entropy") + (("kl_loss",) if "kl_loss" in r else ()):
                key = f"{k}_epoch{epoch + 1}"
                stats[key] = stats.get(key, 0.0) + sum(r[k]) / n / minibatches
            stats["grad_norm"] = r["grad_norm"][0]
            if critic is not None:
                c = pending.result() if pending else critic.value_update(part, n_tok, value_clip)
                share = 1.0 / (minibatches * epochs)
                stats["value_loss"] = stats.get("value_loss", 0.0) + sum(c["value_loss"]) / sum(c["tokens"]) * share
                stats["vf_clipfrac"] = stats.get("vf_clipfrac", 0.0) + sum(c["vf_clipfrac"]) / sum(c["tokens"]) * share


# ---------------------------------------------------------------- the command


def load_prompts(cfg: Config) -> tuple[list[str], list[str], dict[str, str]]:
    """Training prompts, held-out prompts, and each prompt's kind (harmful/benign) where the
    source says."""
    train, held, kinds = split_prompts(cfg.ppo.prompts, "ppo.prompts")
    if len(train) < cfg.ppo.algo.prompts_per_iteration:
        raise ConfigError(f"ppo.algo.prompts_per_iteration ({cfg.ppo.algo.prompts_per_iteration}) exceeds the "
                          f"{len(train)} training prompts")
    return train, held, kinds


def split_prompts(p, section: str) -> tuple[list[str], list[str], dict[str, str]]:
    """A prompt source's distinct prompts: the rest, the first ``eval_prompts`` (held out),
    and each prompt's kind where the source says."""
    rows = data.load_rows(p.source, [p.prompt_field], p.max_samples, p.shuffle_seed)
    kinds = {str(r[p.prompt_field]): str(r[p.kind_field]) for r in rows if r.get(p.kind_field) is not None}
    prompts = list(dict.fromkeys(str(r[p.prompt_field]) for r in rows if str(r[p.prompt_field]).strip()))
    if len(prompts) <= p.eval_prompts:
        raise ConfigError(f"{section}: {len(prompts)} distinct prompts in {p.source}, but eval_prompts "
                          f"holds out {p.eval_prompts}")
    return prompts[p.eval_prompts:], prompts[:p.eval_prompts], kinds


def iteration_prompts(dataset, it: int, n: int, seed: int, samples_per_prompt: int = 1):
    """Iteration ``it``'s prompts drawn from the prompt set's rows (a task: the driver sends
    the handle and the numbers), each repeated ``samples_per_prompt`` times."""
    from ..batch import Batch, column, meta_of

    chosen = prompts_for_iteration(dataset.load().get("prompt"), it, n, seed)
    b = Batch({"prompt": column("prompt", [p for p in chosen for _ in range(samples_per_prompt)])})
    return meta_of(b), b


def prompts_for_iteration(prompts: list[str], it: int, n: int, seed: int) -> list[str]:
    """The prompts of iteration ``it``: a fixed function of (seed, it), so a resumed run
    sees what an uninterrupted one would."""
    per_epoch = len(prompts) // n
    epoch, idx = divmod(it, per_epoch)
    order = list(range(len(prompts)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [prompts[i] for i in order[idx * n:(idx + 1) * n]]


class BaseOfPolicy:
    """PPO's and DPO's reference when the policy trains LoRA: the policy's own ranks with the
    adapter switched off, i.e. the starting model, without a second copy of it. Answers the
    reference calls a PPO iteration, DPO and the evaluation make."""

    def __init__(self, policy):
        self.policy = policy

    @property
    def world_size(self) -> int:
        return self.policy.world_size

    def token_logprobs(self, samples: list[dict], temperature: float = 1.0, batch_size: int = 8):
        return self.policy.token_logprobs(samples, temperature, batch_size, adapter=False)

    def submit(self, method: str, *args, **kwargs):
        if method != "token_logprobs":
            raise ValueError(f"the base-of-policy reference serves token_logprobs, not {method}")
        return self.policy.submit(method, *args, adapter=False, **kwargs)

    def map(self, method: str, items: list, *args, **kwargs) -> list:
        if method not in ("generate", "token_logprobs"):
            raise ValueError(f"the base-of-policy reference maps generate and token_logprobs, not {method}")
        return self.policy.map(method, items, *args, adapter=False, **kwargs)


def check_layout(cfg: Config) -> int:
    """The PPO minibatch in examples, after checking it splits over each trainable group."""
    a = cfg.ppo.algo
    n = a.prompts_per_iteration * a.samples_per_prompt
    if n % a.minibatches:
        raise ConfigError(f"ppo.algo: {n} samples per iteration (prompts_per_iteration x samples_per_prompt) "
                          f"do not split into {a.minibatches} minibatches")
    mb = n // a.minibatches
    roles = [("policy", cfg.ppo.policy)] + ([("critic", cfg.ppo.critic)] if a.estimator == "gae" else [])
    for name, role in roles:
        per = role.group.workers * role.train.micro_batch_size
        if mb % per:
            raise ConfigError(f"ppo: a minibatch of {mb} samples must be a multiple of ppo.{name}.group.workers x "
                              f"ppo.{name}.train.micro_batch_size ({role.group.workers} x "
                              f"{role.train.micro_batch_size})")
    return mb


def _kl_controller(cfg: Config, value: float | None = None):
    k = cfg.ppo.algo.kl
    v = k.coef if value is None else value
    return ppo.AdaptiveKL(v, k.target, k.horizon) if k.target else ppo.FixedKL(v)


def policy_start(cfg: Config, default: Path | None, explicit: ModelConfig | None = None) -> ModelConfig:
    """Where a trained policy starts: the section's own model, else ``default`` (the SFT
    output in `run`), else the top-level model."""
    explicit = explicit if explicit is not None else (cfg.ppo.policy.model if cfg.ppo is not None else None)
    if explicit is not None:
        return explicit
    if default is not None:
        return ModelConfig(name=str(default), dtype=cfg.model.dtype)
    return cfg.model


@contextlib.contextmanager
def _maybe_labeler(cfg: Config, needed: bool):
    if not needed:
        yield None
        return
    from .label import open_labeler

    with open_labeler(cfg) as lab:
        yield lab


def _frozen_groups(frozen: dict[str, Any]) -> list:
    out = [frozen["reference"]] if isinstance(frozen.get("reference"), ActorGroup) else []
    out += list(getattr(frozen.get("rewards"), "groups", []) or [])
    lab = frozen.get("labeler")
    grp = getattr(getattr(lab, "backend", None), "group", None)
    if grp is not None and all(grp is not g for g in out):
        out.append(grp)
    return out


def _frozen_alive(frozen: dict[str, Any], exc: BaseException) -> bool:
    """Whether a recovery can keep the frozen roles: the failure names another role, and
    each of their ranks answers."""
    from ..cluster.group import failed_role

    groups = _frozen_groups(frozen)
    role = failed_role(exc)
    if role is None or role in {g.name for g in groups}:
        return False
    return all(g.alive() for g in groups)


def _start_point(root: str, resume: bool, needs_critic: bool) -> tuple[int, float | None, str | None, str | None]:
    """Where a run (re)starts: (iteration, KL coefficient, policy checkpoint, critic
    checkpoint) of the last commit, or the beginning."""
    resume_from = _resume_point(root, needs_critic) if resume else None
    if resume_from is None:
        return 0, None, None, None
    st = checkpoint.read_state(resume_from)["trainer"]
    it = int(st["iteration"])
    critic_from = checkpoint.step_dir(checkpoint.join(root, "critic"), it) if needs_critic else None
    return it, float(st["kl_coef"]), resume_from, critic_from


def _resume_point(root: str, needs_critic: bool) -> str | None:
    """The policy checkpoint of the newest step that every role committed. Run directories
    written before multi-role commits have only the policy's ``latest``; the critic's
    checkpoint of the same step must exist then."""
    c = checkpoint.last_commit(root)
    if c is not None:
        if needs_critic and "critic" not in c["roles"]:
            raise ConfigError(f"resume: the commit in {root} has no critic, but this config's estimator needs one")
        return checkpoint.step_dir(checkpoint.join(root, "policy"), c["step"])
    ck = checkpoint.latest(checkpoint.join(root, "policy"))
    if ck is not None and needs_critic:
        critic_from = checkpoint.step_dir(checkpoint.join(root, "critic"), checkpoint.read_state(ck)["step"])
        if not checkpoint.is_complete(critic_from):
            raise ConfigError(f"resume: {critic_from} is missing; the critic's checkpoint must match the policy's")
    return ck


def run_ppo(cfg: Config, run_dir: Path | None = None, resume: bool = False, *,
            start_model: Path | None = None, default_rm: Path | None = None) -> dict[str, Any]:
    """``rayalign ppo``. ``start_model`` / ``default_rm`` are what the `run` pipeline's
    earlier stages produced (the SFT policy, the trained reward model)."""
    from ..workers.critic import CriticWorker
    from ..workers.frozen import FrozenLMWorker
    from ..workers.policy import PolicyWorker

    if cfg.ppo is None:
        raise ConfigError("this config has no `ppo` section")
    pc, a = cfg.ppo, cfg.ppo.algo
    mb = check_layout(cfg)
    from ..rewards import open_rewards, preflight
    from .sampling import open_sampler

    preflight(cfg, default_rm)
    train_prompts, held, kinds = load_prompts(cfg)
    run_dir = prepare_run_dir(cfg, run_dir, "ppo", resume)
    root = checkpoint_root(cfg, run_dir)
    start_it, kl_value, resume_from, critic_from = _start_point(root, resume, a.estimator == "gae")
    pmodel = policy_start(cfg, start_model)
    cmodel = pc.critic.model or pmodel
    kl_ctl = _kl_controller(cfg, kl_value)
    need_labeler = any(r.type in ("labeler", "refusal") for r in pc.rewards) or pc.eval.win_rate
    say(f"PPO: {len(train_prompts)} prompts ({len(held)} held out), {a.iterations} iterations of "
        f"{a.prompts_per_iteration}x{a.samples_per_prompt} samples, estimator {a.estimator}, policy "
        f"{pmodel.name} on {pc.policy.group.workers} worker(s) ZeRO-{pc.policy.group.zero.stage}"
        + (f"; resuming after iteration {start_it}" if resume_from else ""))
    tracker = Tracker(run_dir, cfg.tracking, cfg.model_dump(mode="json"), name=f"{cfg.name}-ppo")

    t0 = time.time()
    summary: dict[str, Any] = {}
    ptrain = pc.policy.train.model_copy(update={"batch_size": mb})
    ctrain = pc.critic.train.model_copy(update={"batch_size": mb})
    # One optimizer step per minibatch; the schedule spans the whole run.
    total_steps = a.iterations * a.epochs * a.minibatches
    resumed_at = start_it if resume_from else None
    progress = {"iteration": start_it, "done_at": time.time()}  # what a failure interrupts
    recoveries: list[dict] = []

    def open_frozen(stack: contextlib.ExitStack) -> dict[str, Any]:
        """The roles that hold no training state (reference, labeler, reward models): a
        recovery keeps them running unless one of them is what failed."""
        out: dict[str, Any] = {"reference": None}
        if ptrain.lora is None:
            out["reference"] = stack.enter_context(role_group("reference", FrozenLMWorker, pc.reference))
            out["reference"].init_model(pmodel.model_dump(), pc.reference.zero.model_dump(), True)
        out["labeler"] = stack.enter_context(_maybe_labeler(cfg, need_labeler))
        out["rewards"] = stack.enter_context(open_rewards(cfg, default_rm, out["labeler"]))
        return out

    def attempt(start_it: int, kl_ctl, resume_from: str | None, critic_from: str | None, frozen: dict[str, Any]):
        """The run from ``start_it`` to the end: start the trained roles, iterate, evaluate.
        A lost actor anywhere ends the attempt (its trained roles are stopped on the way out)."""
        _trim_samples(run_dir, start_it)
        progress["finished"] = start_it
        with contextlib.ExitStack() as stack:
            policy = stack.enter_context(role_group("policy", PolicyWorker, pc.policy.group))
            info = policy.init_model(pmodel.model_dump(), pc.policy.group.zero.model_dump(), ptrain.model_dump(),
                                     total_steps, str(resume_from) if resume_from else None)
            say(f"policy ready: {info['params'] / 1e6:.1f}M parameters")
            if ptrain.lora is not None:
                reference = BaseOfPolicy(policy)  # the starting model is the policy's base: one copy
                say("reference: the policy's base model (its LoRA adapter off), no separate group")
            else:
                reference = frozen["reference"]
            critic = None
            if a.estimator == "gae":
                critic = stack.enter_context(role_group("critic", CriticWorker, pc.critic.group))
                critic.init_model(cmodel.model_dump(), pc.critic.group.zero.model_dump(), ctrain.model_dump(),
                                  total_steps, str(critic_from) if critic_from else None)
            labeler, rewards = frozen["labeler"], frozen["rewards"]
            sampler = stack.enter_context(open_sampler(cfg, policy, pmodel, start_it))
            record_placement(run_dir, {"policy": policy, "reference": None if ptrain.lora else reference,
                                       "critic": critic, "rollout": sampler.engines})
            if recoveries and "restart_s" not in recoveries[-1]:
                recoveries[-1]["restart_s"] = round(time.time() - recoveries[-1]["detected_at"], 2)
            # With an engine, the behaviour log-probs are the trainer's unless rollout.logprobs says engine.
            lp_from_rollout = a.logprobs_from_rollout if sampler.engines is None else cfg.rollout.logprobs == "engine"
            ev_cfg = pc.eval
            fixed = held[:ev_cfg.reward_prompts]

            def heldout_eval(it: int) -> None:
                sampler.version = it
                r = heldout_reward(sampler, rewards, fixed, a.max_new_tokens, kinds)
                tracker.log("ppo_heldout", it, r)
                say(f"held-out reward after iteration {it}: {r['heldout_reward']:.3f} on {len(fixed)} fixed prompts")

            if ev_cfg.reward_every and fixed and start_it == 0:
                heldout_eval(0)
            start_path = run_dir / "ppo_start_answers.json"
            if ev_cfg.win_rate and held and start_it == 0:
                # The starting policy's answers for the final comparison, taken now through the
                # rollout engine (the weights are still the start's): on 2 CPU cores this cost 10 s
                # where the reference's HF generate at the end cost ~90 s. Kept on disk so a
                # recovery past iteration 0 reuses them.
                sampler.version = 0
                start_path.write_text(json.dumps({"prompts": held, "max_new_tokens": ev_cfg.max_new_tokens,
                                                  "answers": _generate_all(sampler, held, ev_cfg.max_new_tokens)}))
            bar = Progress(a.iterations, "ppo", initial=start_it)
            stack.callback(bar.close)  # closed before any error or stop message is printed
            backlog: list | None = None
            waiting: tuple[int, dict] | None = None  # a row whose critic losses are still to come
            # The prompt set goes to the object store once; each iteration's prompts are drawn
            # there (a task), so the driver's traffic does not grow with the batch.
            from ..batch import Batch, column, put, task

            dataset = put(Batch({"prompt": column("prompt", train_prompts)}), remote=True)
            saves = Cadence(a.save_every, a.save_minutes)
            for it in range(start_it, a.iterations):
                progress["iteration"] = it
                _, prompts = task(iteration_prompts, dataset, it, a.prompts_per_iteration, a.seed,
                                  a.samples_per_prompt)
                sampler.version = it  # the weights after `it` updates
                m = ppo_iteration(
                    policy, reference, critic, rewards, prompts, temperature=a.temperature, top_p=a.top_p,
                    max_new_tokens=a.max_new_tokens, kl_coef=kl_ctl.value, kl_estimator=a.kl.estimator,
                    estimator=a.estimator, samples_per_prompt=a.samples_per_prompt, gamma=a.gamma, lam=a.lam,
                    clip=a.clip, value_clip=a.value_clip, entropy_coef=a.entropy_coef, epochs=a.epochs,
                    minibatches=a.minibatches, missing_eos_penalty=a.missing_eos_penalty,
                    reward_clip=a.reward_clip, logprobs_from_rollout=lp_from_rollout,
                    rollout_batch_size=a.rollout_batch_size, overlap=a.overlap,
                    defer_critic=a.defer_critic_update and a.overlap != "off", critic_backlog=backlog,
                    seed=a.seed * 100_003 + it, sampler=sampler, tis_cap=cfg.rollout.tis_cap,
                    clip_high=a.clip_high, kl_in_loss=a.kl.placement == "loss", loss_agg=a.loss_aggregation,
                    dynamic_sampling=a.dynamic_sampling, max_sampling_rounds=a.max_sampling_rounds,
                    more_prompts=(lambda r, it=it: task(iteration_prompts, dataset, it, a.prompts_per_iteration,
                                                        a.seed + 104_729 * r, a.samples_per_prompt)[1]),
                    overlong_buffer=a.overlong_buffer, overlong_penalty=a.overlong_penalty)
                m.pop("batch")
                examples = m.pop("examples")
                backlog = m.pop("critic_backlog", None)
                done = it + 1
                if waiting is not None:
                    # The critic update of the previous rollout finished during this rollout: its
                    # losses belong to the previous iteration's row, which is logged now.
                    prev_done, prev = waiting
                    prev.update({k: m.pop(k) for k in ("value_loss", "vf_clipfrac") if k in m})
                    tracker.log("ppo", prev_done, prev)
                    waiting = None
                checkpoint_due = done == a.iterations or saves.due(done, a.iterations)
                if checkpoint_due and backlog:
                    # The checkpoint (and the run's end) holds the critic after its last update.
                    m.update(flush_critic(critic, backlog, a.value_clip))
                    backlog = None
                kl_ctl.update(m["kl"], a.prompts_per_iteration * a.samples_per_prompt)
                if backlog:
                    waiting = (done, m)
                else:
                    tracker.log("ppo", done, m)
                _write_samples(run_dir, done, examples)
                progress["finished"] = done  # its work is lost if a failure comes before its commit
                bar.update(1, reward=m["reward_mean"], kl=m["kl"], s=m["iteration_s"])
                if recoveries and "to_next_iteration_s" not in recoveries[-1]:
                    r = recoveries[-1]
                    r["to_next_iteration_s"] = round(time.time() - r["detected_at"], 2)
                    tracker.log("ppo_recovery", done, r)
                    say(f"recovered: iteration {done} finished {r['to_next_iteration_s']:.0f}s after the failure")
                if ev_cfg.reward_every and fixed and (done % ev_cfg.reward_every == 0 or done == a.iterations):
                    heldout_eval(done)
                if checkpoint_due:
                    # Every role's shard first; the commit then names them together, so a crash
                    # anywhere in between leaves the previous commit whole.
                    state = {"iteration": done, "kl_coef": kl_ctl.value}
                    roles = ["policy"]
                    if critic is not None:
                        critic.save_checkpoint(checkpoint.join(root, "critic"), done, state, 0)
                        roles.append("critic")
                    policy.save_checkpoint(checkpoint.join(root, "policy"), done, state, 0)
                    checkpoint.commit(root, done, roles, a.keep_checkpoints)
                progress["done_at"] = time.time()
            bar.close()
            progress["iteration"] = a.iterations
            if critic is not None:
                critic.kill()  # not needed for the evaluation; its memory is (a CPU rank keeps its peak)
            final = run_dir / "final" / "policy"
            policy.export_hf(str(final))
            ev: dict[str, Any] = {}
            if pc.eval.win_rate and held:
                sampler.version = a.iterations
                ev = evaluate_win_rate(cfg, sampler, reference, labeler, held, kinds,
                                       before=_start_answers(start_path, held, ev_cfg.max_new_tokens))
                tracker.log("ppo_eval", a.iterations, {k: v for k, v in ev.items() if isinstance(v, (int, float))})
            return ev, policy.memory(), final

    with ray_session(cfg.cluster), stage_layout(cfg, "ppo"), contextlib.ExitStack() as kept:
        # stage_layout: colocate_with between PPO's roles, kept across recoveries with the
        # frozen roles it placed.
        frozen = None
        while True:
            try:
                if frozen is None:
                    frozen = open_frozen(kept)
                ev, mem, final = attempt(start_it, kl_ctl, resume_from, critic_from, frozen)
                break
            except Exception as exc:
                if not lost_actor(exc):
                    raise
                detected = time.time()
                what = failure_limit(cfg, "PPO", "ppo", run_dir, len(recoveries), exc)
                keep = frozen is not None and _frozen_alive(frozen, exc)
                if not keep:
                    kept.close()  # one of them failed (or may have): all start again
                    frozen = None
                start_it, kl_value, resume_from, critic_from = _start_point(root, True, a.estimator == "gae")
                kl_ctl = _kl_controller(cfg, kl_value)
                # Finished iterations past the commit resumed from: their work is done again.
                lost_its = max(progress["iteration"], progress.get("finished", 0)) - start_it
                recoveries.append({"failure": len(recoveries) + 1, "what": what, "at_iteration": progress["iteration"],
                                   "resumed_from_iteration": start_it, "iterations_lost": lost_its,
                                   "partial_iteration_s": round(detected - progress["done_at"], 2),
                                   "detected_at": detected, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "kept_running": sorted(g.name for g in _frozen_groups(frozen)) if keep else []})
                say(f"failure {len(recoveries)} of at most {cfg.cluster.max_failures} during iteration {progress['iteration'] + 1}: "
                    f"{what}. Restarting the roles "
                    + (f"(keeping {', '.join(recoveries[-1]['kept_running'])}) " if recoveries[-1]["kept_running"] else "")
                    + "from "
                    + (f"the commit of iteration {start_it}" if resume_from else "the start (no commit yet)"))
    tracker.close()
    plot_metrics(run_dir, "ppo", [["reward_mean"], ["kl"], ["approx_kl", "clipfrac"], ["value_loss"],
                                  ["response_length"], ["generate_s", "score_s", "train_s"]],
                 title=f"{cfg.name}: PPO")
    plot_metrics(run_dir, "ppo_heldout", [["heldout_reward"], ["heldout_refusal_harmful", "heldout_answer_benign"],
                                          ["heldout_length"]],
                 title=f"{cfg.name}: reward on {pc.eval.reward_prompts} fixed held-out prompts (greedy)")
    from ..tracking import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl", "ppo")
    curve = read_metrics(run_dir / "metrics.jsonl", "ppo_heldout")
    first = rows[0] if rows else {}
    last = rows[-1] if rows else {}
    timed = rows[1:] or rows
    summary = {
        "stage": "ppo", "policy_start": pmodel.name, "estimator": a.estimator, "iterations": a.iterations,
        "resumed_from_iteration": resumed_at,
        "recoveries": recoveries,
        "policy_workers": pc.policy.group.workers, "zero_stage": pc.policy.group.zero.stage,
        "reward_first": first.get("reward_mean"), "reward_last": last.get("reward_mean"),
        "reward_last3_mean": statistics.fmean(r["reward_mean"] for r in rows[-3:]) if rows else None,
        "kl_last": last.get("kl"), "kl_max": max((r["kl"] for r in rows), default=None),
        "heldout_reward_curve": [[r["step"], r["heldout_reward"]] for r in curve],
        "first_update": {k: first.get(k) for k in sorted(first) if k.startswith(("approx_kl_epoch", "clipfrac_epoch"))},
        "mean_generate_s": _mean(timed, "generate_s"), "mean_score_s": _mean(timed, "score_s"),
        "mean_train_s": _mean(timed, "train_s"), "mean_iteration_s": _mean(timed, "iteration_s"),
        **ev, "wall_time_s": time.time() - t0, "final_model": str(final),
        "per_rank_state_mb": [round(x["total"] / 2**20, 1) for x in mem],
    }
    write_summary(run_dir, {"ppo": summary}, cfg.name)
    return summary


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else None


def _trim_samples(run_dir: Path, start_it: int) -> None:
    """Drop the logged samples of iterations after ``start_it``: a resumed or recovered run
    samples them again, and the file keeps one copy of each iteration."""
    path = run_dir / "ppo_samples.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= start_it:
                keep.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut by a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def _write_samples(run_dir: Path, it: int, examples: list[dict]) -> None:
    with (run_dir / "ppo_samples.jsonl").open("a") as fh:
        for e in examples:
            fh.write(json.dumps({"iteration": it, **e}) + "\n")


def heldout_reward(policy, rewards, prompts: list[str], max_new_tokens: int,
                   kinds: dict[str, str] | None = None) -> dict[str, float]:
    """The reward of the policy's greedy answers to a fixed prompt set, with each term, the
    answers' mean length and, where prompts have a kind, the rule-based refusal rates."""
    from ..refusal import is_refusal

    answers = _generate_all(policy, prompts, max_new_tokens)
    scores = rewards(prompts, answers)
    out = {"heldout_reward": statistics.fmean(scores),
           **{f"heldout_{k}": v for k, v in rewards.last_terms.items()},
           "heldout_length": statistics.fmean(len(x.split()) for x in answers)}
    kinds = kinds or {}
    for kind, key, want in (("harmful", "heldout_refusal_harmful", True), ("benign", "heldout_answer_benign", False)):
        sel = [is_refusal(x) for q, x in zip(prompts, answers) if kinds.get(q) == kind]
        if sel:
            out[key] = sum(r == want for r in sel) / len(sel)
    return out


def _generate_all(group, prompts: list[str], max_new_tokens: int, chunk: int = 16) -> list[str]:
    """Greedy answers from a group, in chunks of ``chunk`` prompts per rank (a CPU rank's
    memory stays at its peak), each padded so every rank gets work."""
    out: list[str] = []
    step = chunk * group.world_size
    for i in range(0, len(prompts), step):
        out += [x.strip() for x in group.map("generate", prompts[i:i + step], max_new_tokens, 0.0)]
    return out


def refusal_rates(prompts: list[str], after: list[str], before: list[str], kinds: dict[str, str]) -> dict[str, Any]:
    """Refusal rate on harmful prompts and answer rate on benign ones, final (after) vs start
    (before), each with its 95% interval, and the paired change with its interval."""
    from ..algos.stats import paired_difference, rate
    from ..refusal import is_refusal

    out: dict[str, Any] = {}
    for kind, name, want in (("harmful", "refusal_rate_harmful", True), ("benign", "answer_rate_benign", False)):
        idx = [i for i, q in enumerate(prompts) if kinds.get(q) == kind]
        if not idx:
            continue
        a = [is_refusal(after[i]) == want for i in idx]
        b = [is_refusal(before[i]) == want for i in idx]
        out[name] = {"start": rate(sum(b), len(idx)), "final": rate(sum(a), len(idx)),
                     "change": paired_difference(sum(x and not y for x, y in zip(a, b)),
                                                 sum(y and not x for x, y in zip(a, b)), len(idx))}
    return out


def _start_answers(path: Path, held: list[str], max_new_tokens: int) -> list[str] | None:
    """The starting policy's answers saved at iteration 0, where they are for these prompts
    and this answer budget (else None: the reference generates them)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = d.get("prompts") == held and d.get("max_new_tokens") == max_new_tokens and len(d.get("answers", [])) == len(held)
    return list(d["answers"]) if ok else None


def evaluate_win_rate(cfg: Config, policy, reference, labeler, held: list[str],
                      kinds: dict[str, str] | None = None, e=None,
                      before: list[str] | None = None) -> dict[str, Any]:
    """Greedy answers of the final policy and of the starting one (the reference) on
    held-out prompts: the labeler's win rate (with its 95% interval), the rule-based refusal
    and answer rates, and the judge's own agreement with human gold labels, so the win rate
    comes with how far the judge can be trusted. ``e``: the evaluation settings (default
    ``ppo.eval``). ``before``: the starting policy's answers where they were taken already
    (else the reference generates them)."""
    from ..algos.stats import rate
    from ..labeler import report

    e = e or cfg.ppo.eval
    n = len(held)
    say(f"final evaluation: {n} held-out prompts, final policy vs start")
    after = _generate_all(policy, held, e.max_new_tokens)
    if before is None or len(before) != n:
        before = _generate_all(reference, held, e.max_new_tokens)
    # The judge sees the first `win_rate_prompts` of them (its forwards are the evaluation's
    # cost; the rule-based rates below are free and use every prompt). An answer identical to
    # the start's is a tie without asking.
    k = min(n, e.win_rate_prompts or n) if e.win_rate else 0
    ask = [i for i in range(k) if after[i] != before[i]]
    judged = labeler.label([{"context": held[i], "response_1": after[i], "response_2": before[i]} for i in ask])
    by = dict(zip(ask, judged))
    tie = {"p": 0.5, "label": 0, "labeler": judged[0]["labeler"] if judged else None, "identical": True}
    recs = [by.get(i, tie) for i in range(k)]
    wins = sum(1.0 if r["p"] > 0.5 else 0.5 if r["p"] == 0.5 else 0.0 for r in recs)
    same = sum(after[i] == before[i] for i in range(k))
    out: dict[str, Any] = {"eval_prompts": n}
    if k:
        out.update({"win_rate_vs_start": wins / k, "win_rate_ci95": rate(wins, k)["ci95"], "win_rate_prompts": k,
                    "identical_answers": same, "judge": judged[0]["labeler"] if judged else None})
    if e.refusal and kinds:
        out.update(refusal_rates(held, after, before, kinds))
    if e.judge_gold:
        src, rows, why = data.first_loadable(e.judge_gold, ["prompt", "response_1", "response_2"], say)
        rows = [r for r in rows if r.get("gold") in (1, 2, "1", "2")][:e.judge_gold_samples]
        if src is None:
            say(f"judge agreement with people not measured: no gold source loads ({'; '.join(why)})")
            out["judge_agreement_not_measured"] = "; ".join(why)
        else:
            say(f"judge agreement with people: {len(rows)} pairs of {src}"
                + (f" ({'; '.join(why)})" if why else ""))
            rep = report(labeler.label([{"context": r["prompt"], "response_1": r["response_1"],
                                         "response_2": r["response_2"]} for r in rows]),
                         [int(r["gold"]) for r in rows])
            out["judge_agreement"] = rep.get("agreement")
            out["judge_agreement_ci95"] = rep.get("agreement_ci95")
            out["judge_gold_pairs"] = rep.get("gold_pairs")
            out["judge_gold_source"] = src
            if why:
                out["judge_gold_unavailable"] = why
    out["win_examples"] = [{"prompt": q, "final": x[:300], "start": y[:300],
                            "p_final_better": recs[i]["p"] if i < k else None}
                           for i, (q, x, y) in enumerate(list(zip(held, after, before))[:6])]
    return out
