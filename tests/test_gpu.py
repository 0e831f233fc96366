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
