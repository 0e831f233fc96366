"""PPO formulas against hand-computed numbers."""
import math

import pytest
import torch

from rayalign.algos import ppo


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_kl_estimators():
    logp, ref = t([0.0]), t([math.log(0.5)])
    d = math.log(2)
    assert ppo.kl_estimate(logp, ref, "k1").item() == pytest.approx(d)
    assert ppo.kl_estimate(logp, ref, "k2").item() == pytest.approx(d * d / 2)
    assert ppo.kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + d)
    with pytest.raises(ValueError):
        ppo.kl_estimate(logp, ref, "k4")


def test_token_rewards_score_at_last_valid_token():
    score = t([1.0, 2.0])
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.5, 0.7]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    r = ppo.token_rewards(score, kl, mask, beta=0.1)
    assert torch.allclose(r, t([[-0.01, -0.02, -0.03 + 1.0], [-0.05, -0.05 + 2.0, 0.0]]))


def test_eos_penalty_and_normalisation():
    assert ppo.eos_penalty(t([0.3, 0.9]), t([1, 0]), -1.0).tolist() == [0.3, -1.0]
    assert ppo.normalize_scores(t([3.0, -9.0]), 1.0, 2.0, clip=3.0).tolist() == [1.0, -3.0]


def test_gae_by_hand():
    adv, ret = ppo.gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, t([[0.225, 0.25, 0.3]]))
    assert torch.allclose(ret, t([[0.725, 0.85, 1.0]]))
    # Padding past the end contributes nothing (V = 0 there), whatever it holds.
    adv, ret = ppo.gae(t([[0.0, 1.0, 9.0]]), t([[0.5, 0.6, 9.0]]), t([[1, 1, 0]]), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t([[0.5, 0.4, 0.0]]))
    assert torch.allclose(ret, t([[1.0, 1.0, 0.0]]))
    # gamma < 1
    adv, _ = ppo.gae(t([[0.0, 1.0]]), t([[0.0, 0.0]]), t([[1, 1]]), gamma=0.9, lam=1.0)
    assert torch.allclose(adv, t([[0.9, 1.0]]))


def test_reward_to_go_and_baselines():
    assert ppo.reward_to_go(t([[1.0, 0.0, 2.0]]), t([[1, 1, 0]]), gamma=0.5).tolist() == [[1.0, 0.0, 0.0]]
    s = t([1.0, 2.0, 3.0, 6.0])
    assert ppo.sequence_baselines(s, 2, "reinforce").tolist() == [-2.0, -1.0, 0.0, 3.0]
    assert ppo.sequence_baselines(s, 2, "rloo").tolist() == [-1.0, 1.0, -3.0, 3.0]
    gn = ppo.sequence_baselines(s, 2, "group_norm")
    assert torch.allclose(gn, t([-1, 1, -1, 1]) / math.sqrt(2), atol=1e-5)
    with pytest.raises(ValueError, match="groups of 3"):
        ppo.sequence_baselines(s, 3, "rloo")


def test_whitening_ignores_padding():
    out = ppo.masked_whiten(t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]]))
    assert torch.allclose(out, t([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    assert ppo.masked_mean(t([[1.0, 3.0, 50.0]]), t([[1, 1, 0]])).item() == 2.0


def test_policy_loss_by_hand():
    old = t([[0.0, 0.0, 0.0]])
    new = t([[math.log(1.5), math.log(1.5), 5.0]])
    adv = t([[1.0, -1.0, 7.0]])
    mask = t([[1, 1, 0]])
    loss, stats = ppo.policy_loss(new, old, adv, mask, clip=0.2)
    # A=+1: max(-1.5, -1.2) = -1.2 (clipped); A=-1: max(1.5, 1.2) = 1.5; padding ignored
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(0.5 - math.log(1.5))
    same, st = ppo.policy_loss(old, old, adv, mask)
    assert same.item() == pytest.approx(0.0) and st["clipfrac"].item() == 0


def test_value_loss_by_hand():
    loss, stats = ppo.value_loss(t([[1.0]]), t([[0.0]]), t([[2.0]]), t([[1]]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.2 - 2.0) ** 2)  # the clipped error is larger
    assert stats["vf_clipfrac"].item() == 1.0
    loss, _ = ppo.value_loss(t([[1.9]]), t([[1.8]]), t([[2.0]]), t([[1]]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.1 ** 2)


def test_kl_controllers():
    assert ppo.FixedKL(0.05).update(10.0, 64) == 0.05
    ctl = ppo.AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl = ppo.AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert ctl.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))


def test_entropy():
    assert ppo.entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))


# ---------------------------------------------------------------- GRPO, Dr. GRPO, DAPO

def test_group_baselines_by_hand():
    s = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # Group 1: mean 0.5, sample std (n-1) sqrt(1/3); group 2: all equal.
    gn = ppo.sequence_baselines(s, 4, "group_norm")
    assert torch.allclose(gn[:4], t([0.5, -0.5, -0.5, 0.5]) / math.sqrt(1 / 3), atol=1e-5)
    assert torch.allclose(gn[4:], t([0.0] * 4))
    gm = ppo.sequence_baselines(s, 4, "group_mean")  # Dr. GRPO: no std
    assert torch.allclose(gm, t([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert ppo.varied_groups(s, 4).tolist() == [True, False]
    with pytest.raises(ValueError, match="groups of 3"):
        ppo.varied_groups(s, 3)


def test_asymmetric_clip_by_hand():
    old = t([[0.0, 0.0, 0.0]])
    new = t([[math.log(1.25), math.log(1.35), math.log(0.7)]])
    adv = t([[1.0, 1.0, -1.0]])
    mask = t([[1, 1, 1]])
    sym, st = ppo.policy_terms(new, old, adv, mask, clip=0.2)
    # A=+1: min(ρ, 1.2) → -1.2 twice; A=-1, ρ=0.7: max(0.7, 0.8) → 0.8
    assert torch.allclose(sym, t([[-1.2, -1.2, 0.8]]), atol=1e-6)
    assert st["clipfrac"].item() == pytest.approx(1.0)
    high, st = ppo.policy_terms(new, old, adv, mask, clip=0.2, clip_high=0.28)
    # ε_high 0.28: 1.25 is inside the range now, 1.35 clips to 1.28; the low side is unchanged.
    assert torch.allclose(high, t([[-1.25, -1.28, 0.8]]), atol=1e-6)
    assert st["clipfrac"].item() == pytest.approx(2 / 3)


def test_loss_aggregations_by_hand():
    term = t([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    # token mean: (1+2+3+4)/4; GRPO: ((1+2+3)/3 + 4/1)/2; Dr. GRPO: ((6)/8 + 4/8)/2
    assert ppo.aggregate(term, mask, "token_mean").item() == pytest.approx(2.5)
    assert ppo.aggregate(term, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)
    assert ppo.aggregate(term, mask, "seq_mean_token_sum_norm", norm_len=8).item() == pytest.approx(0.625)
    assert ppo.aggregation_count(mask.sum(1), "token_mean") == 4
    assert ppo.aggregation_count(mask.sum(1), "seq_mean_token_sum_norm") == 2
    with pytest.raises(ValueError, match="norm_len"):
        ppo.aggregate(term, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        ppo.aggregate(term, mask, "sum")


def test_grpo_k3_is_the_specs_formula():
    # k3 (Schulman's estimator) = π_ref/π − log(π_ref/π) − 1, ≥ 0, and 0 only where π = π_ref.
    logp, ref = t([math.log(0.5), math.log(0.2)]), t([math.log(0.25), math.log(0.2)])
    k3 = ppo.kl_estimate(logp, ref, "k3")
    assert k3[0].item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert k3[1].item() == 0.0


def test_overlong_penalty_by_hand():
    lens = t([10, 12, 14, 16])
    # budget 16, buffer 4: no penalty to 12 tokens, then -0.5 at 14 and -1 at 16.
    assert torch.allclose(ppo.overlong_penalty(lens, 16, 4).double(), t([0.0, 0.0, -0.5, -1.0]))
    assert torch.allclose(ppo.overlong_penalty(lens, 16, 4, penalty=2.0).double(), t([0.0, 0.0, -1.0, -2.0]))
    with pytest.raises(ValueError, match="buffer"):
        ppo.overlong_penalty(lens, 16, 0)
