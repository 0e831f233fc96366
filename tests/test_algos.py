import math

import torch

from rayalign.algos.lm import IGNORE, count_targets, sequence_logprobs, shifted_nll_sum


def test_shifted_nll_sum_by_hand():
    # vocab 2, logits chosen so that log-softmax is easy: [0, 0] -> log 1/2 each.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE, 0, 1]])
    nll, n = shifted_nll_sum(logits, labels)
    # position 0 predicts label 0 with p = 1/2; position 1 predicts label 1 with p = 1/4
    assert n == 2
    assert torch.isclose(nll, torch.tensor(math.log(2) + math.log(4)))
    labels2 = torch.tensor([[IGNORE, IGNORE, 1]])
    nll2, n2 = shifted_nll_sum(logits, labels2)
    assert n2 == 1 and torch.isclose(nll2, torch.tensor(math.log(4)))
    assert count_targets(labels) == 2 and count_targets(labels2) == 1


def test_sequence_logprobs_temperature():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    tokens = torch.tensor([[0, 0]])
    lp = sequence_logprobs(logits, tokens, temperature=2.0)
    # logits / 2 = [1, 0] -> log softmax at index 0 = 1 - log(e + 1)
    assert torch.isclose(lp[0, 0], torch.tensor(1 - math.log(math.e + 1)))
