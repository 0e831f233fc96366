"""The labeler worker in process: several questions about one encoded text give what each
question asked on its own gives."""
import pytest

from rayalign.cluster.group import LocalGroup
from rayalign.workers.frozen import FrozenLMWorker


@pytest.fixture(scope="module")
def worker():
    grp = LocalGroup("labeler", FrozenLMWorker, threads=1)
    grp.init_model({"name": "tiny-llama"}, {}, True)
    # Not killed: in-process workers share this process's torch.distributed group, which
    # DeepSpeed keeps a handle on for the in-process tests that follow.
    return grp.worker


def test_question_logprobs_equal_separate_prompts(worker):
    texts = ["Question: what is two plus two?\nResponse: four", "Question: hi\nResponse: hello there, friend",
             "Question: a much longer question about many things at once?\nResponse: x"]
    questions = ["\n\nIs this response helpful? Answer Yes or No.", "\n\nIs it harmless? Answer Yes or No."]
    opts = [o for o in ("Yes", "No")]
    # batch 2: texts of different lengths share a left-padded batch, and one batch holds one
    shared = worker.question_logprobs(texts, questions, opts, batch_size=2)
    import torch

    first = [worker.tok(o, add_special_tokens=False)["input_ids"][0] for o in opts]
    for i, t in enumerate(texts):
        for k, q in enumerate(questions):
            # the same prompt scored whole, one at a time, no padding
            lp = worker._last_logprobs([worker.render(t + q)], 1)[0]
            assert shared[i][k] == pytest.approx([float(lp[first[0]]), float(lp[first[1]])], abs=1e-4)
            assert torch.isfinite(lp).all()
    with pytest.raises(ValueError, match="distinct tokens"):
        worker.question_logprobs(texts[:1], questions, ["Yes", "Yes"], 2)
