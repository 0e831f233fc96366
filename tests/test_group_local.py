"""The group interface and a policy worker in process, without Ray."""
import pytest

from rayalign.cluster.group import GroupError, LocalGroup, merge, split_list
from rayalign.cluster.worker import ALL, dispatch
from rayalign.config import TrainConfig, ZeroConfig


def test_split_and_merge():
    assert split_list(range(7), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert merge([[1, 2], [3]]) == [1, 2, 3]
    assert merge([{"a": [1]}, {"a": [2]}]) == {"a": [1, 2]}


def test_undeclared_methods_are_refused(tiny_dir):
    from rayalign.workers.policy import PolicyWorker

    class Group(LocalGroup):
        def __init__(self):  # no worker needed to check the dispatch table
            self.name, self.worker_cls = "p", PolicyWorker

    grp = Group()
    with pytest.raises(AttributeError, match="not a group method"):
        grp.master_endpoint
    with pytest.raises(AttributeError, match="not a group method"):
        grp.no_such_method
    with pytest.raises(GroupError, match="needs a list"):
        grp._split_args("train_step", (3,), 2)
    with pytest.raises(ValueError):
        dispatch("sideways")
    assert getattr(PolicyWorker.save_checkpoint, "_rayalign_dispatch") == ALL


def test_policy_worker_trains_in_process(tiny_dir, tmp_path):
    from rayalign import data, models
    from rayalign.pipelines.sft import data_targets
    from rayalign.workers.policy import PolicyWorker

    tok = models.load_tokenizer(tiny_dir)
    examples = [data.encode_sft(tok, "hello! how are you today?", "i am fine, thank you.", 64)] * 4
    train = TrainConfig(lr=3e-3, batch_size=4, micro_batch_size=2, lr_schedule="constant")
    grp = LocalGroup("policy", PolicyWorker, threads=1)
    grp.init_model({"name": "tiny-llama"}, ZeroConfig(stage=0).model_dump(), train.model_dump(), 5)
    losses = []
    for _ in range(5):
        r = grp.train_step(examples, sum(map(data_targets, examples)))
        losses.append(r["nll_sum"][0] / r["tokens"][0])
    assert losses[-1] < losses[0] * 0.8
    out = grp.generate(["hello! how are you today?"], max_new_tokens=8)
    assert isinstance(out[0], str)
    path = grp.export_hf(str(tmp_path / "hf"))
    reloaded = models.load_causal_lm(path)
    assert sum(p.numel() for p in reloaded.parameters()) > 0
    mem = grp.memory()[0]
    assert mem["params"] > 0 and mem["optimizer"] >= 2 * mem["params"]
