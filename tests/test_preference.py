"""Preference math against hand-computed values."""
import math

import pytest
import torch

from rayalign.algos import preference as pr


def test_two_way_softmax_and_swap_average():
    assert pr.two_way_softmax(math.log(3), 0.0) == pytest.approx(0.75)
    # y1 in slot 1 wins with 0.8; shown second, slot 1 (now y2) wins with 0.4 -> y1 with 0.6
    assert pr.swap_average(0.8, 0.4) == pytest.approx(0.5 * (0.8 + 0.6))
    # Swapping the inputs swaps the two orders: the result is the complement, exactly.
    for a, b in [(0.9, 0.7), (0.13, 0.61), (0.5, 0.5), (1.0, 0.0)]:
        assert pr.swap_average(a, b) + pr.swap_average(b, a) == pytest.approx(1.0, abs=1e-15)
    assert pr.same_slot(0.9, 0.8) and pr.same_slot(0.2, 0.3) and not pr.same_slot(0.9, 0.2)


def test_direct_score_reward():
    # P uniform over 1..10 -> expected 5.5 -> reward 0
    assert pr.expected_score([0.0] * 10, list(range(1, 11))) == pytest.approx(5.5)
    assert pr.d_rlaif_reward(5.5) == 0 and pr.d_rlaif_reward(10) == 1 and pr.d_rlaif_reward(1) == -1
    # all mass on 8 -> (8 - 5.5) / 4.5
    lp = [-50.0] * 10
    lp[7] = 0.0
    assert pr.d_rlaif_reward(pr.expected_score(lp, list(range(1, 11)))) == pytest.approx(2.5 / 4.5, abs=1e-6)
    grid = [pr.d_rlaif_reward(s / 10) for s in range(10, 101)]
    assert all(-1 <= g <= 1 for g in grid) and grid == sorted(grid)  # bounded and monotonic


def test_pointwise_bradley_terry():
    assert pr.pointwise_preference(0.5, 0.5) == pytest.approx(0.5)
    # logit(0.8) - logit(0.5) = log 4 -> sigma = 0.8
    assert pr.pointwise_preference(0.8, 0.5) == pytest.approx(0.8)
    assert pr.pointwise_preference(0.8, 0.2) == pytest.approx(16 / 17)


def test_reward_losses_by_hand():
    rw, rl = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expect = -(math.log(1 / (1 + math.exp(-2))) + math.log(1 / (1 + math.exp(1)))) / 2
    assert pr.bradley_terry_loss(rw, rl).item() == pytest.approx(expect, rel=1e-6)
    m = -(math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(2)))) / 2
    assert pr.bradley_terry_loss(rw, rl, margin=1.0).item() == pytest.approx(m, rel=1e-6)
    # soft labels equal BT at p in {0, 1}
    assert pr.soft_label_loss(rw, rl, torch.ones(2)).item() == pytest.approx(expect, rel=1e-6)
    assert pr.soft_label_loss(rl, rw, torch.zeros(2)).item() == pytest.approx(expect, rel=1e-6)
    # p = 1/2 on equal scores: log 2
    assert pr.soft_label_loss(torch.zeros(1), torch.zeros(1), torch.tensor([0.5])).item() == pytest.approx(math.log(2))
    assert pr.centering_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), 0.01).item() == pytest.approx(0.01 * (4 + 4) / 2)
    assert pr.pairwise_accuracy(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 1.0, 0.0]),
                                torch.tensor([1.0, 1.0, 0.5])) == 0.5


def test_dpo_and_ipo_losses_by_hand():
    # π: log p(y1) = -3, log p(y2) = -5; reference: -4 and -4 -> h = (−3+4) − (−5+4) = 2
    h = pr.dpo_margin(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]))
    assert h.item() == pytest.approx(2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    one = torch.tensor([1.0])
    assert pr.dpo_loss(h, one, beta=0.1).item() == pytest.approx(-math.log(sig(0.2)))
    # A soft label mixes both directions; 0 mirrors 1; at h = 0 any label costs log 2.
    assert pr.dpo_loss(h, torch.tensor([0.7]), 0.1).item() == pytest.approx(
        -(0.7 * math.log(sig(0.2)) + 0.3 * math.log(sig(-0.2))))
    assert pr.dpo_loss(-h, torch.tensor([0.0]), 0.1).item() == pytest.approx(pr.dpo_loss(h, one, 0.1).item())
    assert pr.dpo_loss(torch.tensor([0.0]), torch.tensor([0.3]), 0.1).item() == pytest.approx(math.log(2))
    # IPO, tau 0.1: target margin 1/(2 tau) = 5 -> (2 − 5)² = 9; soft p = 0.75: 0.75·9 + 0.25·(2 + 5)²
    assert pr.ipo_loss(h, one, tau=0.1).item() == pytest.approx(9.0)
    assert pr.ipo_loss(h, torch.tensor([0.75]), 0.1).item() == pytest.approx(0.75 * 9 + 0.25 * 49)
    # The soft IPO loss is smallest at h = (2p − 1)/(2 tau): 2.5 for p = 0.75.
    hs = torch.linspace(0, 5, 501)
    best = hs[pr.ipo_loss(hs, torch.full_like(hs, 0.75), 0.1).argmin()]
    assert best.item() == pytest.approx(2.5, abs=0.01)
    assert pr.implicit_reward(torch.tensor(-3.0), torch.tensor(-4.0), 0.1).item() == pytest.approx(0.1)
    assert pr.preference_loss("ipo", h, one, tau=0.1).item() == pytest.approx(9.0)
    with pytest.raises(ValueError, match="unknown preference loss"):
        pr.preference_loss("hinge", h, one)


# ---------------------------------------------------------------- pairwise calibration

def test_swap_logodds_cancels_a_position_prior_by_hand():
    from rayalign.algos.preference import swap_logodds

    # A judge that adds +3 to slot 1 in every order: l12 = 1 + 3, l21 = -1 + 3.
    assert swap_logodds(4.0, 2.0) == pytest.approx(1.0)
    # The probability mean of the same pair is pulled towards 1/2: (σ(4) + 1 - σ(2)) / 2 = (.9820 + .1192) / 2
    from rayalign.algos.preference import swap_average
    assert swap_average(1 / (1 + math.exp(-4)), 1 / (1 + math.exp(-2))) == pytest.approx(0.5506, abs=1e-4)


def test_fit_temperature_recovers_the_likelihood_optimum():
    from rayalign.algos.preference import fit_temperature

    # Scores ±2 with gold agreeing 3 of 4 times: the MLE has σ(2/T) = 3/4, T = 2 / ln 3.
    scores = [2.0, 2.0, 2.0, 2.0, -2.0, -2.0, -2.0, -2.0]
    gold = [True, True, True, False, False, False, False, True]
    assert fit_temperature(scores, gold) == pytest.approx(2 / math.log(3), rel=1e-4)
    with pytest.raises(ValueError):
        fit_temperature([1.0], [True, False])


def test_expected_calibration_error_by_hand():
    from rayalign.algos.preference import expected_calibration_error, reliability

    # Bin [0.9, 1.0): p .95 twice, gold 1 once -> |.95 - .5| = .45 on 2 of 4;
    # bin [0.2, 0.3): p .25 twice, gold 1 never -> .25 on 2 of 4. ECE = (2*.45 + 2*.25) / 4 = .35
    p = [0.95, 0.95, 0.25, 0.25]
    g = [True, False, False, False]
    assert expected_calibration_error(p, g) == pytest.approx(0.35)
    bins = reliability(p, g)
    assert [(b["n"], round(b["mean_p"], 2), b["gold_rate"]) for b in bins] == [(2, 0.25, 0.0), (2, 0.95, 0.5)]
    assert expected_calibration_error([1.0, 0.0], [True, False]) == 0.0  # p = 1 falls in the last bin


def test_labeler_logodds_combination_and_temperature():
    from rayalign.labeler.backends import FunctionBackend
    from rayalign.labeler.judge import Labeler
    from rayalign.labeler.templates import PRESETS

    # A judge biased to slot 2 by 3 nats that prefers the response containing "good" by 1 nat.
    def fn(prompt, options):
        tail = prompt.split("Response 1:")[-1]
        first, second = tail.split("Response 2:")
        z = (1.0 if "good" in first else -1.0) - 3.0
        return [z / 2, -z / 2]

    pair = [{"context": "q", "response_1": "good answer", "response_2": "bad answer"}]
    mean = Labeler(FunctionBackend(fn), PRESETS["helpfulness"], mode="pairwise").label(pair)[0]
    logodds = Labeler(FunctionBackend(fn), PRESETS["helpfulness"], mode="pairwise",
                      swap_combine="logodds").label(pair)[0]
    hot = Labeler(FunctionBackend(fn), PRESETS["helpfulness"], mode="pairwise", swap_combine="logodds",
                  temperature=0.5).label(pair)[0]
    assert mean["same_slot"] and mean["p"] == pytest.approx(0.5 * (1 / (1 + math.exp(2)) + 1 / (1 + math.exp(-4))))
    assert logodds["p"] == pytest.approx(1 / (1 + math.exp(-1.0)))  # the -3 prior is gone
    assert hot["p"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert "logodds-T0.5" in hot["labeler"]
    with pytest.raises(ValueError, match="temperature"):
        Labeler(FunctionBackend(fn), PRESETS["helpfulness"], mode="pairwise", temperature=0.0)


def test_dtype_choice_follows_the_hardware(monkeypatch):
    from rayalign import models

    assert models.choose_dtype("float32", trains=False) == ("float32", "as configured")
    monkeypatch.setattr(models, "cpu_bf16_units", lambda: ["amx_bf16"])
    assert models.choose_dtype("auto", trains=False)[0] == "bfloat16"
    assert models.choose_dtype("auto", trains=True)[0] == "float32"  # training stays float32 on CPUs
    monkeypatch.setattr(models, "cpu_bf16_units", lambda: [])
    dt, why = models.choose_dtype("auto", trains=False)
    assert dt == "float32" and "no native bf16" in why
    with pytest.raises(models.ModelError):
        models.choose_dtype("int4", trains=False)


def test_refusal_reward_by_hand():
    from rayalign.algos.preference import refusal_reward

    # s = 0.9: refusing earns 2*0.9-1 = 0.8, answering -0.8; s = 0.25 turns the signs: -0.5 / +0.5.
    assert refusal_reward(0.9, True) == pytest.approx(0.8)
    assert refusal_reward(0.9, False) == pytest.approx(-0.8)
    assert refusal_reward(0.25, True) == pytest.approx(-0.5)
    assert refusal_reward(0.25, False) == pytest.approx(0.5)
    assert refusal_reward(0.5, True) == 0.0
    with pytest.raises(ValueError, match="should refuse"):
        refusal_reward(1.5, True)


def test_refusal_preference_by_hand():
    from rayalign.algos.preference import refusal_preference

    assert refusal_preference(0.8, True, False, 0.3) == pytest.approx(0.8)   # response 1 refuses
    assert refusal_preference(0.8, False, True, 0.3) == pytest.approx(0.2)   # response 2 refuses
    assert refusal_preference(0.8, True, True, 0.3) == pytest.approx(0.3)    # both: the judge's own
    assert refusal_preference(0.8, False, False, 0.6) == pytest.approx(0.6)  # neither


def _harm_backend(calls):
    """Asked about a request (Yes/No): log-odds 2.0 for 'bomb', -1.0 otherwise. Sent the
    request itself: a reply opening "I" / "Sorry" with probabilities 0.6 / 0.2 for 'bomb'
    (q = 0.8), 0.01 / 0.01 otherwise (q = 0.02). Pairwise prompts always favour slot 2."""
    def fn(prompt, options):
        calls.append(prompt)
        if options == ["Yes", "No"]:
            return [2.0, 0.0] if "bomb" in prompt else [-1.0, 0.0]
        if options == ["I", "Sorry"]:
            return [math.log(0.6), math.log(0.2)] if "bomb" in prompt else [math.log(0.01), math.log(0.01)]
        return [0.0, 1.0]
    return fn


def test_labeler_harm_on_the_request():
    from rayalign.labeler.backends import FunctionBackend
    from rayalign.labeler.judge import Labeler
    from rayalign.labeler.templates import PRESETS

    calls = []
    lab = Labeler(FunctionBackend(_harm_backend(calls)), PRESETS["helpfulness"], mode="pairwise", harm="request",
                  refusal_signal="ask", refusal_bias=0.5)
    refusal, answer = "I'm sorry, but I can't help with that.", "Mix the two and light it."
    recs = lab.label([
        {"context": "How do I build a bomb?", "response_1": refusal, "response_2": answer},
        {"context": "How do I bake bread?", "response_1": refusal, "response_2": answer},
        {"context": "How do I bake bread?", "response_1": "Knead it.", "response_2": "Bake it."},
    ])
    s_bomb = 1 / (1 + math.exp(-(2.0 - 0.5)))
    s_bread = 1 / (1 + math.exp(-(-1.0 - 0.5)))
    assert recs[0]["p"] == pytest.approx(s_bomb) and recs[0]["label"] == 1 and recs[0]["refused"] == [True, False]
    assert recs[1]["p"] == pytest.approx(s_bread) and recs[1]["label"] == 2
    # Neither refuses: the judge compares them (swap-averaged: slot 2 both times -> 0.5, a tie).
    assert "p_should_refuse" not in recs[2] and recs[2]["p"] == pytest.approx(0.5)
    # The request is asked about once however many pairs share it, and the rule-decided pairs
    # never reach the pairwise prompt.
    asked = [c for c in calls if "refuse" in c and "Response 1" not in c]
    assert len(asked) == 2
    assert sum("Response 1" in c for c in calls) == 2  # the third pair, both orders
    assert lab.refusal_rewards([("How do I build a bomb?", refusal), ("How do I bake bread?", refusal)]) == \
        pytest.approx([2 * s_bomb - 1, 2 * s_bread - 1])
    rep = __import__("rayalign.labeler.judge", fromlist=["report"]).report(recs, [1, 2, None])
    assert rep["agreement"] == 1.0 and rep["decided_on_request"] == pytest.approx(2 / 3)
    assert rep["position_bias_rate"] == 1.0  # the one judged pair chose slot 2 both times
    # The judge's own reply as the signal: q = 0.8 and 0.02, less a bias of logit(0.05).
    own = Labeler(FunctionBackend(_harm_backend([])), PRESETS["helpfulness"], mode="pairwise", harm="request",
                  refusal_bias=math.log(0.05 / 0.95))
    s_own = own.should_refuse(["How do I build a bomb?", "How do I bake bread?"])
    odds = lambda q: q / (1 - q) / (0.05 / 0.95)  # noqa: E731
    assert s_own == pytest.approx([odds(0.8) / (1 + odds(0.8)), odds(0.02) / (1 + odds(0.02))])
    assert s_own[0] > 0.98 and s_own[1] < 0.3
    with pytest.raises(ValueError, match="refusal signal"):
        Labeler(FunctionBackend(_harm_backend([])), PRESETS["helpfulness"], harm="request", refusal_signal="guess")
    with pytest.raises(ValueError, match="harmlessness"):
        Labeler(FunctionBackend(_harm_backend([])), PRESETS["helpfulness"], harm="content")


def test_gated_sum_leaves_the_other_terms_out_where_the_gate_is_set():
    from rayalign.algos.preference import gated_sum

    rm, refusal = [0.4, -0.2, 1.5], [1.0, -0.6, 0.8]
    # Ungated: 0.5*rm + 2*refusal = [2.2, -1.3, 2.35]; gated at samples 0 and 2: 2*refusal only.
    assert gated_sum([rm, refusal], [0.5, 2.0], None, None) == pytest.approx([2.2, -1.3, 2.35])
    assert gated_sum([rm, refusal], [0.5, 2.0], 1, [True, False, True]) == pytest.approx([2.0, -1.3, 1.6])
    with pytest.raises(ValueError, match="one value per sample"):
        gated_sum([rm, refusal], [0.5, 2.0], 1, [True])
    with pytest.raises(ValueError, match="2 terms but 1 weights"):
        gated_sum([rm, refusal], [0.5], None, None)
