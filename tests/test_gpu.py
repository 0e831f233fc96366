"""GPU-only: the policy worker on CUDA with NCCL and bf16 (skipped on CPU machines)."""
import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stage", [0, 3])
def test_policy_trains_on_cuda(tiny_dir, stage):
    import torch

    from rayalign import data, models
    from rayalign.cluster.group import LocalGroup
    from rayalign.config import TrainConfig, ZeroConfig
    from rayalign.pipelines.sft import data_targets
    from rayalign.workers.policy import PolicyWorker

    assert torch.cuda.is_available()
    tok = models.load_tokenizer(tiny_dir)
    ex = [data.encode_sft(tok, "hello! how are you today?", "i am fine, thank you.", 64)] * 4
    grp = LocalGroup("policy", PolicyWorker)
    assert grp.worker.device.type == "cuda"
    train = TrainConfig(lr=3e-3, batch_size=4, micro_batch_size=2, lr_schedule="constant")
    grp.init_model({"name": "tiny-llama", "dtype": "bfloat16"}, ZeroConfig(stage=stage).model_dump(),
                   train.model_dump(), 5)
    losses = []
    for _ in range(5):
        r = grp.train_step(ex, sum(map(data_targets, ex)))
        losses.append(r["nll_sum"][0] / r["tokens"][0])
    assert losses[-1] < losses[0]
    assert isinstance(grp.generate(["hello!"], max_new_tokens=4)[0], str)


def test_weight_sync_into_an_engine_on_cuda(tiny_dir):
    """The sync path on a GPU, in process (no Ray, no vLLM on the device machine): a bf16
    policy updates, its weights go to an HF engine on the same device; the engine then holds
    exactly the trainer's parameters and decodes as it does."""
    from rayalign.cluster.group import LocalGroup
    from rayalign.config import TrainConfig, ZeroConfig
    from rayalign.workers.policy import PolicyWorker
    from rayalign.workers.rollout import RolloutWorker

    model = {"name": "tiny-llama", "dtype": "bfloat16"}
    pol = LocalGroup("policy", PolicyWorker)
    pol.init_model(model, ZeroConfig().model_dump(),
                   TrainConfig(lr=5e-3, batch_size=4, micro_batch_size=4, lr_schedule="constant").model_dump(), 5)
    eng = LocalGroup("rollout", RolloutWorker)
    eng.init_engine(model, "hf", {}, -1)
    prompts = ["hello! how are you today?", "tell me a joke"] * 2
    samples = pol.rollout(prompts, 8, 1.0, 1.0, 0, 4)
    for s in samples:
        s["old_logprobs"] = s["rollout_logprobs"] or [0.0] * len(s["response_ids"])
        s["advantages"] = [1.0] * len(s["response_ids"])
    pol.ppo_update(samples, sum(len(s["response_ids"]) for s in samples), 0.2, 1.0)
    r = pol.sync_weights([eng.worker], 1, 0.05, 60)
    assert r["digest"] == pol.weights_digest() == eng.state_digest()[0]
    got = [s["response_ids"] for s in eng.rollout(prompts, 8, 0.0, 1.0, 0, 8, 0, 1)]
    assert got == [s["response_ids"] for s in pol.rollout(prompts, 8, 0.0, 1.0, 0, 8)]
