"""Packed sequences (one row, position ids restarting per sequence, no padding) give what
the padded layout gives, for every role's forward and loss, within 1e-5.

Each worker runs in process; the same worker computes both layouts (its ``packing`` flag
flipped), so the weights are the same. Training steps use a learning rate so small that
fp32 weights do not move, so a second step sees the first step's weights."""
import random

import pytest
import torch

from rayalign.algos.lm import IGNORE, layout, layout_labeled, sample_layout
from rayalign.cluster.group import LocalGroup
from rayalign.config import TrainConfig, ZeroConfig

# ZeRO-1 for the trainers: its optimizer reports the gradient norm (the plain one does not).
STILL = TrainConfig(lr=1e-30, batch_size=4, micro_batch_size=4, lr_schedule="constant", grad_clip=1e9)  # norm computed, never clipped


def _close(a, b, tol=1e-5):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max()


def _both(worker, fn):
    """fn() with packing on, then off; the worker's setting is restored."""
    was = worker.packing
    try:
        worker.packing = True
        on = fn()
        worker.packing = False
        off = fn()
    finally:
        worker.packing = was
    return on, off


def _samples(vocab: int, n: int = 4, seed: int = 0) -> list[dict]:
    """Prompt+response samples of skewed lengths, with PPO's per-token fields."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.choice([3, 7, 19]), rng.choice([1, 5, 23])
        out.append({"prompt_ids": [rng.randrange(3, vocab) for _ in range(p)],
                    "response_ids": [rng.randrange(3, vocab) for _ in range(r)],
                    "old_logprobs": [-rng.uniform(0.5, 6) for _ in range(r)],
                    "advantages": [rng.uniform(-1, 1) for _ in range(r)],
                    "old_values": [rng.uniform(-1, 1) for _ in range(r)],
                    "returns": [rng.uniform(-1, 1) for _ in range(r)]})
    return out


def test_layouts_place_each_sequence_by_hand():
    seqs = [[5, 6, 7, 1], [8, 9], [4]]
    pad = layout(seqs, 0)
    assert pad.ids.tolist() == [[5, 6, 7, 1], [8, 9, 0, 0], [4, 0, 0, 0]]
    assert pad.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    # Packed: rows as wide as the longest sequence, filled longest first; a row's unused end
    # is padding in a segment of its own (its positions restart too).
    packed = layout(seqs, 0, packed=True)
    assert packed.ids.tolist() == [[5, 6, 7, 1], [8, 9, 4, 0]] and packed.attention_mask is None
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert (packed.rows, packed.cols) == ([0, 1, 1], [0, 0, 2])
    # tokens 1.. of each sequence are scored at shifted positions col + t - 1
    assert packed.span_mask([1, 1, 1], [3, 1, 0]).tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pad.span_mask([1, 1, 1], [3, 1, 0]).tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    frame = torch.arange(6.0).view(2, 3)
    assert packed.slices(frame, [1, 1], [3, 1]) == [[0.0, 1.0, 2.0], [3.0]]
    assert packed.to_frame([[7.0, 8.0, 9.0], [6.0]], [1, 1]).tolist() == [[7, 8, 9], [6, 0, 0]]
    assert packed.flat(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])).tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert pad.flat(pad.ids).tolist() == [5, 6, 7, 1, 8, 9, 4]
    # every sequence alone in a row when none fits beside another: the padded layout's rows
    assert layout([[1, 2], [3, 4]], 0, packed=True).ids.tolist() == [[1, 2], [3, 4]]
    _, labels = layout_labeled([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
                                {"input_ids": [8], "labels": [8]},
                                {"input_ids": [9, 2], "labels": [IGNORE, 2]}], 0, packed=True)
    assert labels.tolist() == [[IGNORE, 6, 7], [IGNORE, 2, IGNORE]]  # never scored across a boundary
    t, act = sample_layout([{"prompt_ids": [1, 2], "response_ids": [3]},
                            {"prompt_ids": [4], "response_ids": [5]}], 0, packed=True)
    assert t.ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert act.tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match="at least one token"):
        layout([[1], []], 0)


def test_policy_sft_and_ppo_packed_equal_padded(tiny_dir):
    from rayalign import data, models
    from rayalign.workers.policy import PolicyWorker

    tok = models.load_tokenizer(tiny_dir)
    grp = LocalGroup("policy", PolicyWorker, threads=1)
    try:
        info = grp.init_model({"name": "tiny-llama"}, ZeroConfig(stage=1).model_dump(), STILL.model_dump(), 10)
        assert info["packing"] is True  # a llama keeps attention inside each packed sequence
        w = grp.worker
        examples = [data.encode_sft(tok, "hi " * k, "fine, thanks " * (5 - k), 64) for k in (1, 2, 4, 4)]
        with torch.no_grad():
            (nll_p, n_p), (nll_d, n_d) = _both(w, lambda: w.lm_nll(examples))
        assert n_p == n_d > 0
        _close(float(nll_p), float(nll_d))
        targets = sum(map(lambda e: sum(1 for x in e["labels"][1:] if x != IGNORE), examples))
        sp, sd = _both(w, lambda: grp.train_step(examples, targets))
        _close(sp["nll_sum"], sd["nll_sum"])
        _close(sp["grad_norm"], sd["grad_norm"])
        assert sd["grad_norm"][0] > 0

        samples = _samples(len(tok))
        lp_p, lp_d = _both(w, lambda: grp.token_logprobs(samples, 0.7, 3))
        assert [len(x) for x in lp_p] == [len(s["response_ids"]) for s in samples]
        _close([x for r in lp_p for x in r], [x for r in lp_d for x in r])
        tokens = sum(len(s["response_ids"]) for s in samples)
        up, ud = _both(w, lambda: grp.ppo_update(samples, tokens, 0.2, 0.7, 0.01))
        for k in ("loss", "clipfrac", "approx_kl", "entropy", "grad_norm"):
            _close(up[k], ud[k])
        assert ud["grad_norm"][0] > 0
    finally:
        grp.kill()


def test_critic_reward_and_reference_packed_equal_padded(tiny_dir):
    from rayalign import models
    from rayalign.workers.critic import CriticWorker
    from rayalign.workers.frozen import FrozenLMWorker
    from rayalign.workers.reward import RewardWorker

    tok = models.load_tokenizer(tiny_dir)
    samples = _samples(len(tok), seed=1)
    tokens = sum(len(s["response_ids"]) for s in samples)
    grp = LocalGroup("critic", CriticWorker, threads=1)
    try:
        grp.init_model({"name": "tiny-llama"}, ZeroConfig(stage=1).model_dump(), STILL.model_dump(), 10)
        assert grp.worker.packing
        vp, vd = _both(grp.worker, lambda: grp.values(samples, 3))
        _close([x for r in vp for x in r], [x for r in vd for x in r])
        up, ud = _both(grp.worker, lambda: grp.value_update(samples, tokens, 0.2))
        for k in ("value_loss", "vf_clipfrac", "grad_norm"):
            _close(up[k], ud[k])
    finally:
        grp.kill()

    grp = LocalGroup("reward", RewardWorker, threads=1)
    try:
        grp.init_model({"name": "tiny-llama"}, ZeroConfig(stage=1).model_dump(), STILL.model_dump(), 10)
        assert grp.worker.packing
        seqs = [s["prompt_ids"] + s["response_ids"] for s in samples]
        seqs[1] = seqs[1] + [tok.pad_token_id]  # pooled where a padded row pools: before a trailing pad id
        sp, sd = _both(grp.worker, lambda: grp.score(seqs, False, 3))
        _close(sp, sd)
        pairs = [{"ids_1": seqs[i], "ids_2": seqs[-1 - i], "p": p} for i, p in enumerate((0.9, 0.2, 0.5, 1.0))]
        tp, td = _both(grp.worker, lambda: grp.train_step(pairs, len(pairs)))
        _close(tp["loss_sum"], td["loss_sum"])
        _close(tp["grad_norm"], td["grad_norm"])
        assert td["grad_norm"][0] > 0
    finally:
        grp.kill()

    grp = LocalGroup("reference", FrozenLMWorker, threads=1)
    try:
        grp.init_model({"name": "tiny-llama"}, ZeroConfig().model_dump(), True)
        assert grp.worker.packing
        rp, rd = _both(grp.worker, lambda: grp.token_logprobs(samples, 0.7, 3))
        _close([x for r in rp for x in r], [x for r in rd for x in r])
        items = [("what is two plus two?", "four"), ("hi", "hello there, how are you doing today")]
        cp, cd = _both(grp.worker, lambda: grp.continuation_logprobs(items))
        assert [n for _, n in cp] == [n for _, n in cd]
        _close([x for x, _ in cp], [x for x, _ in cd])
    finally:
        grp.kill()


def test_an_encoder_falls_back_to_padding():
    from rayalign.workers.reward import RewardWorker

    grp = LocalGroup("reward", RewardWorker, threads=1)
    try:
        info = grp.init_model({"name": "tiny-bert"}, ZeroConfig().model_dump(), STILL.model_dump(), 10)
        assert info["packing"] is False  # bidirectional attention ignores packed position ids
        assert len(grp.score([[5, 6, 7], [8, 9]], False)) == 2
    finally:
        grp.kill()
