"""The rollout role: engines, weight sync, versions, and the failures that must be loud."""
import math
import os
import signal
import time

import pytest
import torch

from rayalign import rollout as ro
from rayalign.algos import ppo
from rayalign.config import GroupConfig, TrainConfig, ZeroConfig

# vLLM's CPU attention kernels take head sizes of 32 and up (tiny-llama's own is 16). The
# embeddings are tied as SmolLM2's are (vLLM's reload leaves a tied head behind: re-tied).
MODEL = {"name": "tiny-llama", "overrides": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                                              "num_key_value_heads": 1, "head_dim": 64, "tie_word_embeddings": True}}
PROMPTS = ["hello! how are you today?", "what is the capital of france?", "tell me a joke", "why is the sky blue?"]
needs_vllm = pytest.mark.skipif(not ro.vllm_available(), reason="vLLM is not installed")


# ---------------------------------------------------------------- pure parts


def test_buckets_hold_whole_layers():
    t = torch.zeros(4)  # 16 bytes
    named = [("model.embed_tokens.weight", t), ("model.layers.0.q.weight", t), ("model.layers.0.k.weight", t),
             ("model.layers.1.q.weight", t), ("model.layers.1.k.weight", t), ("model.layers.10.q.weight", t),
             ("model.norm.weight", t)]
    got = [[n for n, _ in b] for b in ro.buckets(named, 20)]
    # A bucket closes only at a layer boundary once it holds >= 20 bytes.
    assert got == [["model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.0.k.weight"],
                   ["model.layers.1.q.weight", "model.layers.1.k.weight"],
                   ["model.layers.10.q.weight", "model.norm.weight"]]
    assert [[n for n, _ in b] for b in ro.buckets(named, 10**9)] == [[n for n, _ in named]]
    assert ro.layer_key("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"


def test_digests_are_exact_and_order_free():
    a = torch.arange(6, dtype=torch.float32).view(2, 3)
    d = ro.tensor_digest("w", a)
    assert d == ro.tensor_digest("w", a.clone())
    b = a.clone()
    b[1, 2] = torch.nextafter(b[1, 2], torch.tensor(100.0))  # one ulp
    assert ro.tensor_digest("w", b) != d
    assert ro.tensor_digest("w", a.view(3, 2)) != d  # same bytes, other shape
    assert ro.tensor_digest("v", a) != d
    assert ro.combine_digests({"x": "1", "y": "2"}) == ro.combine_digests({"y": "2", "x": "1"})
    assert ro.combine_digests({"x": "1", "y": "2"}) != ro.combine_digests({"x": "1", "y": "3"})


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_finish_sample_cuts_at_eos_and_drops_pads():
    eos, pad = 2, 0
    s = ro.finish_sample([5, 6], [7, 8, 2, 9], [-0.1, -0.2, -0.3, -0.4], eos, pad, _Tok())
    assert s["response_ids"] == [7, 8, 2] and s["ended"] and s["rollout_logprobs"] == [-0.1, -0.2, -0.3]
    s = ro.finish_sample([5], [7, 8], [-0.1, -0.2], eos, pad, _Tok())
    assert s["response_ids"] == [7, 8] and not s["ended"]
    s = ro.finish_sample([5], [7, 0, 8], [-0.1, -0.2, -0.3], eos, pad, _Tok())
    assert s["response_ids"] == [7, 8] and s["rollout_logprobs"] is None  # no longer the sampled sequence
    s = ro.finish_sample([5], [0, 0], [-0.1, -0.2], eos, pad, _Tok())
    assert s["response_ids"] == [eos] and s["rollout_logprobs"] is None


def test_truncated_importance_weights_and_drift():
    trainer = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]])
    engine = torch.tensor([[math.log(0.25), math.log(0.4), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = ppo.truncated_is_weights(trainer, engine, cap=1.5)
    assert torch.allclose(w[0, :2], torch.tensor([1.5, 0.5]))  # 0.5/0.25 = 2 capped at 1.5; 0.2/0.4
    d = ppo.logprob_drift(trainer, engine, mask)
    assert d["logprob_drift_max"] == pytest.approx(math.log(2))
    assert d["logprob_drift_mean"] == pytest.approx(math.log(2))


def test_policy_loss_weights_each_token():
    logp = torch.tensor([[-1.0, -2.0]])
    old = logp.clone()
    adv = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2)
    loss, _ = ppo.policy_loss(logp, old, adv, mask, 0.2, torch.tensor([[0.5, 2.0]]))
    # ratio 1: terms -A = [-1, 2], weighted [-0.5, 4], mean 1.75
    assert float(loss) == pytest.approx(1.75)
    assert float(ppo.policy_loss(logp, old, adv, mask, 0.2)[0]) == pytest.approx(0.5)


def test_engine_choice(tmp_path):
    assert ro.resolve_engine("hf") == ("hf", None)
    assert ro.resolve_engine("trainer") == ("trainer", None)
    assert ro.resolve_engine("auto")[0] == ("vllm" if ro.vllm_available() else "trainer")
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "num_attention_heads": 4}')
    kind, why = ro.resolve_engine("auto", str(tmp_path))
    if ro.vllm_available() and not torch.cuda.is_available():
        assert kind == "trainer" and "this model's is 16" in why
        with pytest.raises(ro.RayalignError, match="rollout.engine is vllm, but vLLM's CPU kernels"):
            ro.resolve_engine("vllm", str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 128, "num_attention_heads": 2}')
    assert ro.resolve_engine("auto", str(tmp_path))[0] == ("vllm" if ro.vllm_available() else "trainer")


def test_rollout_config_checks():
    from rayalign.config import RolloutConfig

    with pytest.raises(ValueError, match="needs rollout.logprobs: trainer"):
        RolloutConfig(logprobs="engine", tis_cap=2.0)


# ---------------------------------------------------------------- engines in process


def _policy(stage=0, lr=5e-3):
    from rayalign.cluster.group import LocalGroup
    from rayalign.workers.policy import PolicyWorker

    pol = LocalGroup("policy", PolicyWorker, threads=1)
    tr = TrainConfig(lr=lr, batch_size=4, micro_batch_size=4, lr_schedule="constant").model_dump()
    pol.init_model(MODEL, ZeroConfig(stage=stage).model_dump(), tr, 100)
    return pol


def _engine(kind):
    from rayalign.cluster.group import LocalGroup
    from rayalign.workers.rollout import RolloutWorker

    eng = LocalGroup("rollout", RolloutWorker, threads=1)
    eng.init_engine(MODEL, kind, {"max_model_len": 512, "kv_cache_gb": 0.25}, -1)
    return eng


def _update(pol):
    """One PPO step on the policy's own samples with made-up advantages: weights move."""
    samples = pol.rollout(PROMPTS, 8, 1.0, 1.0, 0, 4)
    for s in samples:
        s["old_logprobs"] = s["rollout_logprobs"] or [0.0] * len(s["response_ids"])
        s["advantages"] = [1.0 if t % 2 == 0 else -1.0 for t in s["response_ids"]]
    pol.ppo_update(samples, sum(len(s["response_ids"]) for s in samples), 0.2, 1.0)


def _greedy_ids(group, prompts, n=12):
    return [s["response_ids"] for s in group.rollout(prompts, n, 0.0, 1.0, 0, 8)]


def _engine_greedy(eng, version):
    return [s["response_ids"] for s in eng.rollout(PROMPTS, 12, 0.0, 1.0, 0, 8, 0, version)]


def _targets(eng):
    return getattr(eng, "actors", None) or [eng.worker]


@pytest.mark.timeout(300)
def test_sync_after_an_update_gives_the_trainers_weights(tiny_dir):
    pol, eng = _policy(), _engine("hf")
    try:
        _check_sync(pol, eng, "hf")
    finally:
        eng.kill()
        pol.kill()


def _check_sync(pol, eng, kind):
    before = pol.sync_weights(_targets(eng), 0, 0.05, 60)
    # embeddings (the LM head is tied to them), 9 tensors in each of 2 layers, final norm
    assert before["params"] == 1 + 9 * 2 + 1
    assert before["sync_buckets"] > 1  # 0.05 MB buckets: the tiny model goes in pieces
    assert _engine_greedy(eng, 0) == _greedy_ids(pol, PROMPTS)
    _update(pol)
    assert pol.weights_digest() != before["digest"]
    after = pol.sync_weights(_targets(eng), 1, 0.05, 60)
    # Every parameter arrived exactly as the trainer holds it...
    assert after["digest"] == pol.weights_digest()
    if kind == "hf":  # ...and (where the engine's layout is the trainer's) is what it holds
        assert eng.state_digest()[0] == after["digest"]
    # ...and the engine decodes as the trainer does.
    assert _engine_greedy(eng, 1) == _greedy_ids(pol, PROMPTS)
    samples = eng.rollout(PROMPTS, 8, 1.0, 1.0, 3, 8, 0, 1)
    assert {s["weight_version"] for s in samples} == {1}
    # Sampled log-probs: the trainer's recomputation agrees up to kernel differences.
    tl = pol.token_logprobs(samples, 1.0)
    d = max(abs(a - b) for s, t in zip(samples, tl) for a, b in zip(s["rollout_logprobs"], t))
    assert d < 1e-3, d
    with pytest.raises(Exception, match="holds weights of version 1, the trainer is at 2"):
        eng.rollout(PROMPTS, 4, 1.0, 1.0, 0, 8, 0, 2)


@pytest.mark.timeout(120)
def test_a_sync_that_delivers_other_weights_is_refused(tiny_dir):
    eng = _engine("hf")
    try:
        w = dict(eng.worker.engine.model.named_parameters())
        eng.begin_sync(1)
        eng.load_bucket([("model.norm.weight", w["model.norm.weight"].detach() + 1)])
        with pytest.raises(ro.SyncError, match="delivered 1 of 5 parameters"):
            eng.end_sync(1, "not-the-trainers-hash", 5)
        assert eng.weights_version() == [None]  # not committed: rollouts at any version are refused
        with pytest.raises(ro.WeightVersionError):
            eng.rollout(PROMPTS, 4, 1.0, 1.0, 0, 8, 0, 1)
        with pytest.raises(ro.SyncError, match="outside a sync"):
            eng.load_bucket([("model.norm.weight", w["model.norm.weight"])])
    finally:
        eng.kill()


@needs_vllm
@pytest.mark.timeout(300)
def test_vllm_greedy_equals_hf_greedy(tiny_dir):
    hf, vl = _engine("hf"), _engine("vllm")
    try:
        assert _engine_greedy(vl, -1) == _engine_greedy(hf, -1)
    finally:
        vl.kill()
        hf.kill()


@needs_vllm
@pytest.mark.timeout(300)
def test_vllm_seeded_sampling_of_more_prompts_than_one_step_prefills(tiny_dir):
    # 80 prompts of ~130 tokens exceed a step's token budget (8,192): with chunked prefill
    # a CPU engine died rewinding a seeded generator ("CPU Generator does not use offset").
    prompts = [f"question {i}: " + "tell me more about the weather " * 6 for i in range(80)]
    eng = _engine("vllm")
    try:
        a = eng.rollout(prompts, 4, 1.0, 1.0, 7, 16, 0, -1)
        b = eng.rollout(prompts, 4, 1.0, 1.0, 7, 16, 0, -1)
        assert sum(len(s["prompt_ids"]) for s in a) > 8192
        assert [s["response_ids"] for s in a] == [s["response_ids"] for s in b]
        got = eng.generate(prompts[:3], 4, 1.0, 7, 16, True)
        assert [g["response"] for g in got] == [s["response"] for s in a[:3]]
        assert [g["ended"] for g in got] == [s["ended"] for s in a[:3]]
    finally:
        eng.kill()


# ---------------------------------------------------------------- on Ray


@pytest.mark.ray
@needs_vllm
@pytest.mark.timeout(600)
def test_vllm_sync_from_zero3_timeout_and_a_dead_engine(local_ray):
    import ray

    from rayalign.cluster.group import GroupError
    from rayalign.pipelines.common import role_group
    from rayalign.workers.policy import PolicyWorker
    from rayalign.workers.rollout import RolloutWorker

    tr = TrainConfig(lr=5e-3, batch_size=4, micro_batch_size=2, lr_schedule="constant").model_dump()
    with role_group("policy", PolicyWorker, GroupConfig(workers=2, cpus_per_worker=1, zero=ZeroConfig(stage=3))) as pol, \
            role_group("rollout", RolloutWorker, GroupConfig(workers=1, cpus_per_worker=1), timeout_s=120) as eng:
        pol.init_model(MODEL, ZeroConfig(stage=3).model_dump(), tr, 100)
        eng.init_engine(MODEL, "vllm", {"max_model_len": 512, "kv_cache_gb": 0.25}, -1)
        # ZeRO-3 over 2 ranks into vLLM: parameters gathered one at a time, layer buckets.
        _check_sync(pol, eng, "vllm")

        # An engine that stops answering: the sync fails within its timeout, loudly.
        # (After that the trainer's rank 1 waits in a gather rank 0 left: a failed sync ends a job.)
        pid = eng.node_info()[0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            t = time.time()
            with pytest.raises(Exception, match="did not finish .* within rollout.sync_timeout_s=5s"):
                pol.sync_weights(eng.actors, 2, 0.05, 5)
            assert time.time() - t < 60
        finally:
            os.kill(pid, signal.SIGCONT)

        # An engine killed in the middle of a rollout: an error that names the role and rank.
        # (The stopped engine resumed inside an abandoned sync: it samples only unversioned.)
        with pytest.raises(Exception, match="partly loaded weights"):
            eng.rollout(PROMPTS, 4, 1.0, 1.0, 0, 8, 0, 2)
        # Work for several seconds (a faster machine finished 64 x 64 tokens inside the old 1 s
        # wait, and the kill came after the call): the kill lands while it runs.
        pending = eng.submit("rollout", PROMPTS * 64, 128, 1.0, 1.0, 0, 8, 128, None)
        time.sleep(0.5)
        ray.kill(eng.actors[0], no_restart=True)
        with pytest.raises(GroupError, match=r"rollout.rollout: rank\(s\) \[0\] died during the call"):
            pending.result()
