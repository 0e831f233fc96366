"""LoRA (train.lora): only adapters train and are checkpointed, the reference is the base
model with the adapter off, and what leaves the role is the merged model under HF names."""
import pytest
import torch

from rayalign import lora
from rayalign.cluster.group import LocalGroup
from rayalign.config import LoraConfig, TrainConfig, ZeroConfig

LC = LoraConfig(r=4, alpha=8.0)


def test_merge_by_hand():
    w, a, b = torch.ones(3, 2), torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0], [2.0]])
    named = [("base_model.model.l.q.base_layer.weight", w), ("base_model.model.l.q.base_layer.bias", torch.zeros(3)),
             ("base_model.model.l.q.lora_A.default.weight", a), ("base_model.model.l.q.lora_B.default.weight", b),
             ("base_model.model.score.original_module.weight", torch.zeros(1, 2)),
             ("base_model.model.score.modules_to_save.default.weight", torch.full((1, 2), 5.0)),
             ("base_model.model.norm.weight", torch.ones(2))]
    out = dict(lora.merged(iter(named), LoraConfig(r=1, alpha=2.0)))
    assert list(out) == ["l.q.bias", "l.q.weight", "score.weight", "norm.weight"]
    # W + (alpha / r) B A, with B A = [[1, 2], [0, 0], [2, 4]]
    assert out["l.q.weight"].tolist() == [[3.0, 5.0], [1.0, 1.0], [5.0, 9.0]]
    assert out["score.weight"].tolist() == [[5.0, 5.0]]
    none = dict(lora.merged(iter([(n, None) for n, _ in named]), LC))
    assert set(none) == set(out) and all(v is None for v in none.values())  # a rank that only gathers
    with pytest.raises(ValueError, match="without both halves"):
        list(lora.merged(iter(named[:3]), LC))


def _logprobs(model, samples):
    from rayalign.algos.lm import response_slices, sample_layout, sequence_logprobs

    t, _ = sample_layout(samples, 0)
    with torch.no_grad():
        return response_slices(sequence_logprobs(model(**t.inputs("cpu")).logits, t.ids), t, samples)


def _flat(x):
    return [v for r in x for v in r]


def test_lora_policy_trains_adapters_checkpoints_them_and_exports_merged(tiny_dir, tmp_path):
    from rayalign import checkpoint, data, models
    from rayalign.workers.policy import PolicyWorker

    tok = models.load_tokenizer(tiny_dir)
    examples = [data.encode_sft(tok, "hello! how are you today?", "i am fine, thank you.", 64)] * 4
    targets = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
    samples = [{"prompt_ids": e["input_ids"][:6], "response_ids": e["input_ids"][6:14]} for e in examples[:2]]
    base = models.load_causal_lm(tiny_dir)
    base_lp = _logprobs(base, samples)

    full = TrainConfig(lr=1e-2, batch_size=4, micro_batch_size=2, lr_schedule="constant")
    grp = LocalGroup("policy", PolicyWorker, threads=1)
    try:
        grp.init_model({"name": "tiny-llama"}, ZeroConfig(stage=1).model_dump(), full.model_dump(), 5)
        grp.train_step(examples, targets)
        full_mem = grp.memory()[0]
    finally:
        grp.kill()

    train = full.model_copy(update={"lora": LC})
    grp = LocalGroup("policy", PolicyWorker, threads=1)
    try:
        info = grp.init_model({"name": "tiny-llama"}, ZeroConfig(stage=1).model_dump(), train.model_dump(), 5)
        w = grp.worker
        trainable = [n for n, p in w.engine.module.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        losses = [grp.train_step(examples, targets) for _ in range(4)]
        losses = [r["nll_sum"][0] / r["tokens"][0] for r in losses]
        assert losses[-1] < losses[0] * 0.95
        # the reference: the base model, the adapter switched off, equal to the model never wrapped
        ref = grp.token_logprobs(samples, 1.0, 8, False)
        assert torch.allclose(torch.tensor(_flat(ref)), torch.tensor(_flat(base_lp)), atol=1e-5)
        now = grp.token_logprobs(samples, 1.0)
        assert not torch.allclose(torch.tensor(_flat(now)), torch.tensor(_flat(ref)), atol=1e-3)
        # optimizer state only for the adapters: a small fraction of full fine-tuning's
        mem = grp.memory()[0]
        assert mem["optimizer"] < 0.1 * full_mem["optimizer"], (mem, full_mem)

        ck = grp.save_checkpoint(str(tmp_path / "ck"), 4, {"note": "lora"})
        shards = checkpoint.Shards(ck)
        names = set(shards.shapes)
        assert names == set(trainable)  # only the adapters
        shards.close()
        out = grp.export_hf(str(tmp_path / "hf"))
        digest = grp.weights_digest()
    finally:
        grp.kill()

    # the export is a plain HF model: merged weights under the base model's names
    merged = models.load_causal_lm(out)
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in base.named_parameters()}
    assert torch.allclose(torch.tensor(_flat(_logprobs(merged, samples))), torch.tensor(_flat(now)), atol=1e-5)
    assert digest

    # resume: the base from the starting model, the adapters (and their moments) from the checkpoint
    grp = LocalGroup("policy", PolicyWorker, threads=1)
    try:
        info = grp.init_model({"name": "tiny-llama"}, ZeroConfig(stage=1).model_dump(), train.model_dump(), 5, ck)
        assert info["step"] == 4
        again = grp.token_logprobs(samples, 1.0)
        assert torch.allclose(torch.tensor(_flat(again)), torch.tensor(_flat(now)), atol=1e-6)
    finally:
        grp.kill()


@pytest.mark.parametrize("role", ["critic", "reward"])
def test_lora_heads_train_with_their_adapters(role, tiny_dir, tmp_path):
    from rayalign import models
    from rayalign.workers.critic import CriticWorker
    from rayalign.workers.reward import RewardWorker

    cls = {"critic": CriticWorker, "reward": RewardWorker}[role]
    train = TrainConfig(lr=1e-2, batch_size=2, micro_batch_size=2, lr_schedule="constant", lora=LC)
    grp = LocalGroup(role, cls, threads=1)
    try:
        grp.init_model({"name": "tiny-llama"}, ZeroConfig(stage=1).model_dump(), train.model_dump(), 5)
        trainable = [n for n, p in grp.worker.engine.module.named_parameters() if p.requires_grad]
        assert any("lora_" in n for n in trainable)
        assert any("modules_to_save" in n and "score" in n for n in trainable)  # the new head trains in full
        out = grp.export_hf(str(tmp_path / role))
    finally:
        grp.kill()
    import transformers

    auto = {"critic": transformers.AutoModelForTokenClassification,
            "reward": transformers.AutoModelForSequenceClassification}[role]
    m = auto.from_pretrained(out, num_labels=1)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in m.named_parameters())
    assert models.load_tokenizer(out) is not None


def test_lora_with_gradient_checkpointing_trains(tiny_dir):
    """Checkpointed layers recompute from a frozen embedding's output: the adapters must still
    get gradients (PEFT's input-grad hook)."""
    from rayalign import data, models
    from rayalign.workers.policy import PolicyWorker

    tok = models.load_tokenizer(tiny_dir)
    examples = [data.encode_sft(tok, "hello! how are you today?", "i am fine, thank you.", 64)] * 2
    targets = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
    train = TrainConfig(lr=1e-2, batch_size=2, micro_batch_size=2, lr_schedule="constant", lora=LC)
    grp = LocalGroup("policy", PolicyWorker, threads=1)
    try:
        grp.init_model({"name": "tiny-llama", "gradient_checkpointing": True}, ZeroConfig(stage=1).model_dump(),
                       train.model_dump(), 3)
        first = grp.train_step(examples, targets)
        assert first["grad_norm"][0] > 0
        last = [grp.train_step(examples, targets) for _ in range(2)][-1]
        assert last["nll_sum"][0] < first["nll_sum"][0]
    finally:
        grp.kill()
