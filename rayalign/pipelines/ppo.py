"""One PPO iteration over any set of groups (actor groups or in-process ones).

rollout → score → reference log-probs → values → token rewards → GAE → whitening →
policy and critic updates. The function reads like single-process code; where each
role runs is the groups' business.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..algos import ppo


def _frame(lists: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample response lists into [B, R] right-padded tensors plus their mask."""
    width = max(len(x) for x in lists)
    t = torch.zeros((len(lists), width))
    m = torch.zeros((len(lists), width))
    for i, x in enumerate(lists):
        t[i, :len(x)] = torch.tensor(x)
        m[i, :len(x)] = 1
    return t, m


def _unframe(t: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [row[: int(m.sum())].tolist() for row, m in zip(t, mask)]


def ppo_iteration(policy, reference, critic, reward_fn: Callable[[list[str], list[dict]], list[float]],
                  prompts: list[str], *, temperature: float = 0.7, max_new_tokens: int = 32,
                  kl_coef: float = 0.05, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                  clip: float = 0.2, value_clip: float = 0.2, epochs: int = 1, minibatch: int | None = None,
                  missing_eos_penalty: float | None = None, seed: int = 0) -> dict[str, Any]:
    times: dict[str, float] = {}
    t = time.time()
    samples = policy.rollout(prompts, max_new_tokens, temperature, 1.0, seed)
    times["generate_s"] = time.time() - t

    t = time.time()
    scores = torch.tensor(reward_fn(prompts, samples), dtype=torch.float32)
    if missing_eos_penalty is not None:
        scores = ppo.eos_penalty(scores, torch.tensor([s["ended"] for s in samples]), missing_eos_penalty)
    old_logp = policy.token_logprobs(samples, temperature)
    ref_logp = reference.token_logprobs(samples, temperature)
    values = critic.values(samples) if critic is not None else None
    times["score_s"] = time.time() - t

    logp, mask = _frame(old_logp)
    ref, _ = _frame(ref_logp)
    kl = ppo.kl_estimate(logp, ref, kl_estimator) * mask
    rewards = ppo.token_rewards(scores, kl, mask, kl_coef)
    if critic is not None:
        v, _ = _frame(values)
        adv, returns = ppo.gae(rewards, v, mask, gamma, lam)
    else:
        returns = ppo.reward_to_go(rewards, mask, gamma)
        adv = returns - (returns * mask).sum() / mask.sum()
    adv = ppo.masked_whiten(adv, mask)

    for i, s in enumerate(samples):
        n = int(mask[i].sum())
        s["old_logprobs"] = old_logp[i]
        s["advantages"] = adv[i, :n].tolist()
        if critic is not None:
            s["old_values"] = values[i]
            s["returns"] = returns[i, :n].tolist()

    t = time.time()
    mbs = minibatch or len(samples)
    stats: dict[str, float] = {}
    for epoch in range(epochs):
        for j in range(0, len(samples), mbs):
            part = samples[j:j + mbs]
            tokens = sum(len(s["response_ids"]) for s in part)
            r = policy.ppo_update(part, tokens, clip, temperature)
            n = sum(r["tokens"])
            for k in ("loss", "clipfrac", "approx_kl", "entropy"):
                stats.setdefault(f"{k}_epoch{epoch + 1}", 0.0)
                stats[f"{k}_epoch{epoch + 1}"] += sum(r[k]) / n * len(part) / len(samples)
            if critic is not None:
                c = critic.value_update(part, tokens, value_clip)
                stats["value_loss"] = stats.get("value_loss", 0.0) + sum(c["value_loss"]) / sum(c["tokens"]) \
                    * len(part) / len(samples) / epochs
    times["train_s"] = time.time() - t
    seq_kl = (kl * mask).sum(1)
    return {
        "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "kl": float(seq_kl.mean()), "response_length": float(mask.sum(1).mean()),
        "ended_rate": sum(s["ended"] for s in samples) / len(samples),
        "policy_loss": stats.get(f"loss_epoch{epochs}", 0.0), "clipfrac": stats.get(f"clipfrac_epoch{epochs}", 0.0),
        "approx_kl": stats.get(f"approx_kl_epoch{epochs}", 0.0), "entropy": stats.get(f"entropy_epoch{epochs}", 0.0),
        **{k: v for k, v in stats.items() if "_epoch" in k}, "value_loss": stats.get("value_loss"),
        **times, "samples": samples,
    }
