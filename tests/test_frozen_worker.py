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


def test_option_extensions_reuse_the_prompt_encoding(tiny_dir):
    """A multi-token option's later tokens are scored on the prompt's cached keys and values;
    the answers equal those of encoding prompt + prefix again (the sharded ranks' path)."""
    from rayalign.cluster.group import LocalGroup
    from rayalign.workers.frozen import FrozenLMWorker

    g = LocalGroup("labeler", FrozenLMWorker)
    g.init_model({"name": str(tiny_dir)}, {}, False)
    w = g.worker
    items = [("Which is better? Preferred Response=", ["1", "2", "10"]), ("Say a longer number" * 3, ["12", "1"]),
             ("hi", ["Yes", "No"])] * 3
    cached = w.option_logprobs(items, 4)
    w.lockstep = True
    try:
        encoded = w.option_logprobs(items, 4)
    finally:
        w.lockstep = False
    assert [len(r) for r in cached] == [len(o) for _, o in items]
    for a, b in zip(cached, encoded):
        assert a == pytest.approx(b, abs=1e-4)


def test_shared_prefix_forward_equals_each_prompt_alone(worker):
    """The judge's prompts share the chat template's opening and, in pairs, a question: the
    shared stretches encoded once give each prompt's own unpadded forward (its last
    token's log-probs), with groups of one, two and three and tails of different lengths."""
    import torch

    q = "Question: what is the capital of France, and why is it that city?\n\n"
    texts = [worker.render(q + "Answer A: Paris.\n\nAnswer B: Lyon, by a long way.\n\nWhich? Reply A or B."),
             worker.render(q + "Answer A: Lyon, by a long way.\n\nAnswer B: Paris.\n\nWhich? Reply A or B."),
             worker.render(q + "Answer A: Nice.\n\nAnswer B: Paris.\n\nWhich? Reply A or B."),
             worker.render("Tell me how to pick a lock."),
             worker.render("Question: hi\n\nAnswer A: hello\n\nAnswer B: hey there, friend of mine\n\nWhich?")]
    shared = worker._last_logprobs(texts, 2)
    for t, row in zip(texts, shared):
        alone = worker._last_logprobs([t], 1, share=False)[0]
        assert torch.isfinite(row).all()
        assert torch.allclose(row, alone, atol=1e-4), (t, (row - alone).abs().max())
    # and the same texts in one plain padded batch
    plain = worker._last_logprobs(texts, 8, share=False)
    for a, b in zip(shared, plain):
        assert torch.allclose(a, b, atol=1e-4)
