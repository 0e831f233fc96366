"""Grouping a judge's prompts by the stretches they share (hand-worked token lists)."""
from rayalign.algos.lm import common_prefix_len, prefix_groups


def test_common_prefix_len():
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_len([[5], [6]]) == 0
    assert common_prefix_len([[1, 2]]) == 2
    assert common_prefix_len([]) == 0


def test_prefix_groups_pairs_and_singletons():
    head = [9, 9]
    a1 = head + [1, 2, 3, 4, 10, 11]   # question 1, order 12
    a2 = head + [1, 2, 3, 4, 11, 10]   # question 1, order 21
    b = head + [5, 6, 7]               # alone
    c1 = head + [1, 2, 3, 4, 12]       # question 1 again, a third prompt
    groups = prefix_groups([a1, a2, b, c1], start=2, min_shared=3)
    # sorted past the head: a1 < a2 < c1 (all start 1,2,3,4) < b
    assert groups == [([0, 1, 3], 4), ([2], 0)]
    # min_shared above what they share: every prompt alone
    assert prefix_groups([a1, a2, b, c1], start=2, min_shared=5) == [([0], 0), ([1], 0), ([3], 0), ([2], 0)]


def test_prefix_groups_keep_one_token_of_each_prompt():
    # one prompt is the other's prefix: the shared part stops a token short of the shorter one
    short = [1, 2, 3, 4]
    long = [1, 2, 3, 4, 5, 6]
    assert prefix_groups([long, short], start=0, min_shared=2) == [([1, 0], 3)]
    # identical prompts
    assert prefix_groups([[1, 2, 3], [1, 2, 3]], start=1, min_shared=1) == [([0, 1], 1)]
