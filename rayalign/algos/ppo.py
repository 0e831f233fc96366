"""PPO for language models as small pure functions over [batch, tokens] tensors and masks.

References: Ziegler et al. 2019 (adaptive KL), Ouyang et al. 2022 (InstructGPT),
Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"), Schulman et al.
2016 (GAE), Ahmadian et al. 2024 (RLOO), Shao et al. 2024 (GRPO group normalisation).
Masks are 1 on valid response tokens, 0 on padding and past the first EOS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over valid tokens only; padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---------------------------------------------------------------- KL

def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimators on sampled tokens, d = log π − log π_ref:
    k1 = d; k2 = d²/2; k3 = exp(−d) − 1 + d (Schulman 2020, 'Approximating KL')."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid token (0 for an empty row)."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (idx * mask.long()).max(dim=1).values


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = −β·KL_t on every valid token, plus the sequence score at the last valid one."""
    r = -beta * kl * mask
    last = last_valid_index(mask)
    r[torch.arange(r.shape[0]), last] += score * (mask.sum(1) > 0)
    return r


def eos_penalty(score: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Responses that stop without EOS (truncated) get ``penalty`` instead of their score
    when ``penalty`` is set (Huang et al. 2024, detail 23)."""
    return torch.where(ended.bool(), score, torch.full_like(score, penalty))


def normalize_scores(score: torch.Tensor, mean: float, std: float, clip: float | None = None) -> torch.Tensor:
    """(s − mean)/std with the RM's stored statistics, then optionally clipped to ±clip."""
    out = (score - mean) / max(std, 1e-8)
    return out.clamp(-clip, clip) if clip else out


# ---------------------------------------------------------------- advantages

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over valid tokens; V = 0 past the end.

    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γ λ A_{t+1},  R_t = A_t + V_t.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)
        last = last * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Σ_{k≥t} γ^{k−t} r_k over valid tokens (REINFORCE returns)."""
    out = torch.zeros_like(rewards)
    run = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        run = rewards[:, t] * mask[:, t] + gamma * run
        out[:, t] = run * mask[:, t]
    return out


def sequence_baselines(scores: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """Per-sequence advantages for critic-free estimators; samples of one prompt are
    consecutive in groups of ``group_size``.

    * ``reinforce``: s − mean over the batch (REINFORCE with a baseline);
    * ``rloo``: s − mean of the *other* samples of the same prompt;
    * ``group_norm``: (s − group mean) / group std (GRPO).
    """
    if kind == "reinforce":
        return scores - scores.mean()
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not form groups of {group_size}")
    g = scores.view(-1, group_size)
    if kind == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 samples per prompt")
        return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).reshape(-1)
    if kind == "group_norm":
        std = g.std(1, keepdim=True) if group_size > 1 else torch.ones_like(g[:, :1])
        return ((g - g.mean(1, keepdim=True)) / (std + 1e-6)).reshape(-1)
    raise ValueError(f"unknown estimator {kind!r} (reinforce, rloo, group_norm)")


# ---------------------------------------------------------------- losses

def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2, is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(logπ − logπ_old).
    Also returns clip fraction and approximate KL (k3 of old vs new).

    ``is_weights``: per-token importance weights for samples drawn by another engine than
    the trainer (:func:`truncated_is_weights`), multiplying each token's term."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1 - clip, 1 + clip)
    term = torch.maximum(loss1, loss2)
    if is_weights is not None:
        term = term * is_weights
    loss = masked_mean(term, mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss2 > loss1).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def truncated_is_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling for rollouts from an inference engine: the engine
    samples from π_engine, which differs from the trainer's π_old by kernels and precision;
    weight each token by min(π_old / π_engine, C) (Yao et al., 2025: "Your efficient RL
    framework secretly brings you off-policy RL training"). No gradient flows through it."""
    return torch.exp(trainer_logp - engine_logp).clamp(max=cap).detach()


def logprob_drift(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean and max |Δ log p| per response token between trainer and engine."""
    d = (trainer_logp - engine_logp).abs() * mask
    n = mask.sum()
    return {"logprob_drift_mean": float(d.sum() / n) if n else 0.0, "logprob_drift_max": float(d.max()) if n else 0.0}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½ mean max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±ε_v)."""
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    l1, l2 = (values - returns) ** 2, (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((l2 > l1).float(), mask)
    return loss, {"vf_clipfrac": vf_clipfrac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------- KL controllers

@dataclass
class FixedKL:
    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


@dataclass
class AdaptiveKL:
    """Ziegler et al. 2019: e = clip(KL/target − 1, ±0.2); β ← β(1 + e·n/horizon)."""
    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> float:
        err = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value
