"""PPO for language models as small pure functions over [batch, tokens] tensors and masks.

References: Ziegler et al. 2019 (adaptive KL), Ouyang et al. 2022 (InstructGPT),
Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"), Schulman et al.
2016 (GAE), Ahmadian et al. 2024 (RLOO), Shao et al. 2024 (GRPO), Liu et al. 2025
(Dr. GRPO), Yu et al. 2025 (DAPO).
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
    * ``group_norm``: (s − group mean) / group std (GRPO);
    * ``group_mean``: s − group mean (Dr. GRPO: no division by the group's std, which
      weights groups whose rewards barely differ as much as those that differ a lot).
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
    if kind == "group_mean":
        return (g - g.mean(1, keepdim=True)).reshape(-1)
    raise ValueError(f"unknown estimator {kind!r} (reinforce, rloo, group_norm, group_mean)")


def varied_groups(scores: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """Per group of ``group_size`` consecutive scores: True where they are not all equal.
    A group whose samples all score the same has zero group-relative advantage and gives
    no policy gradient; DAPO's dynamic sampling drops it and samples other prompts."""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not form groups of {group_size}")
    g = scores.view(-1, group_size)
    return (g.max(1).values - g.min(1).values) > tol


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the score: 0 up to ``max_len − buffer``
    tokens, then falling linearly to ``−penalty`` at ``max_len`` (and beyond)."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in 1..{max_len}, not {buffer}")
    over = (lengths.float() - (max_len - buffer)).clamp(min=0) / buffer
    return -penalty * over.clamp(max=1.0)


# ---------------------------------------------------------------- losses

def policy_terms(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                 clip: float = 0.2, is_weights: torch.Tensor | None = None,
                 clip_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)),
    ρ = exp(logπ − logπ_old), before any averaging; also the clip fraction and approximate
    KL (k3 of old vs new) over valid tokens.

    ``clip_high``: ε_high (DAPO's clip-higher, e.g. 0.28 with ε_low 0.2, lets unlikely
    tokens with a positive advantage grow further); None: symmetric. ``is_weights``:
    per-token importance weights for samples drawn by another engine than the trainer
    (:func:`truncated_is_weights`), multiplying each token's term."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1 - clip, 1 + (clip if clip_high is None else clip_high))
    term = torch.maximum(loss1, loss2)
    if is_weights is not None:
        term = term * is_weights
    with torch.no_grad():
        clipfrac = masked_mean((loss2 > loss1).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return term * mask, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2, is_weights: torch.Tensor | None = None,
                clip_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`policy_terms` averaged over all valid tokens (PPO's token mean)."""
    term, stats = policy_terms(logp, old_logp, adv, mask, clip, is_weights, clip_high)
    return masked_mean(term, mask), stats


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregation_weights(lengths: torch.Tensor, mode: str, norm_len: int | None = None) -> torch.Tensor:
    """Each sequence's per-token weight in the summed loss, whose divisor is
    :func:`aggregation_count`:

    * ``token_mean``: 1 (÷ all tokens of the batch: DAPO's token-level loss, where long
      answers weigh as much per token as short ones);
    * ``seq_mean_token_mean``: 1/|o_i| (÷ sequences: GRPO's mean of per-answer means,
      which gives each token of a long answer less weight);
    * ``seq_mean_token_sum_norm``: 1/``norm_len``, a constant such as the generation
      budget (÷ sequences: Dr. GRPO, without the length bias of 1/|o_i|)."""
    if mode == "token_mean":
        return torch.ones_like(lengths, dtype=torch.float32)
    if mode == "seq_mean_token_mean":
        return 1.0 / lengths.float().clamp(min=1)
    if mode == "seq_mean_token_sum_norm":
        if not norm_len or norm_len < 1:
            raise ValueError("seq_mean_token_sum_norm needs a constant normaliser norm_len >= 1")
        return torch.full_like(lengths, 1.0 / norm_len, dtype=torch.float32)
    raise ValueError(f"unknown loss aggregation {mode!r} ({', '.join(AGGREGATIONS)})")


def aggregation_count(lengths: torch.Tensor, mode: str) -> int:
    """What the summed loss is divided by: tokens (token_mean) or sequences."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r} ({', '.join(AGGREGATIONS)})")
    return int(lengths.sum()) if mode == "token_mean" else int(lengths.numel())


def aggregate(term: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
              norm_len: int | None = None) -> torch.Tensor:
    """A [B, T] per-token loss reduced to one number by ``mode`` (one right-padded row per
    sequence; the workers apply the same weights token by token in any layout)."""
    lengths = mask.sum(1)
    w = aggregation_weights(lengths, mode, norm_len)[:, None]
    return (term * mask * w).sum() / max(1, aggregation_count(lengths, mode))


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
