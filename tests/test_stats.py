"""Confidence intervals against hand-computed values."""

import pytest

from rayalign.algos.stats import paired_difference, rate, wilson_interval


def test_wilson_by_hand():
    # k=7, n=10, z=1.96: centre (0.7 + 0.19208) / 1.38416 = 0.644492;
    # half 1.96 * sqrt(0.021 + 0.0096040) / 1.38416 = 0.247719
    lo, hi = wilson_interval(7, 10, z=1.96)
    assert lo == pytest.approx(0.644492 - 0.247719, abs=1e-4)
    assert hi == pytest.approx(0.644492 + 0.247719, abs=1e-4)
    # k=0: the lower end is 0 and the upper end z^2 / (n + z^2)
    lo, hi = wilson_interval(0, 20, z=1.96)
    assert lo == 0 and hi == pytest.approx(1.96 ** 2 / (20 + 1.96 ** 2), abs=1e-9)
    # symmetric: k of n and n - k of n mirror each other
    a, b = wilson_interval(3, 17), wilson_interval(14, 17)
    assert a[0] == pytest.approx(1 - b[1]) and a[1] == pytest.approx(1 - b[0])
    r = rate(30, 40)
    assert r["rate"] == 0.75 and r["n"] == 40 and r["ci95"][0] < 0.75 < r["ci95"][1]
    with pytest.raises(ValueError):
        wilson_interval(5, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_paired_difference_by_hand():
    # 100 items, B alone right on 20, A alone on 5: diff 0.15.
    # Adjusted: b=20.5, c=5.5, m=102: d=15/102=0.147059; se=sqrt(26 - 225/102)/102=0.047823
    r = paired_difference(20, 5, 100, z=1.96)
    assert r["difference"] == pytest.approx(0.15)
    assert r["ci95"][0] == pytest.approx(0.147059 - 1.96 * 0.047823, abs=1e-5)
    assert r["ci95"][1] == pytest.approx(0.147059 + 1.96 * 0.047823, abs=1e-5)
    assert r["ci95"][0] > 0  # clearly better
    r = paired_difference(4, 4, 64)
    assert r["difference"] == 0 and r["ci95"][0] < 0 < r["ci95"][1]
    assert paired_difference(0, 0, 10)["ci95"][0] == pytest.approx(-paired_difference(0, 0, 10)["ci95"][1])
    with pytest.raises(ValueError):
        paired_difference(6, 5, 10)


def test_auc_by_hand():
    from rayalign.algos.stats import auc

    # pairs (pos, neg): (3,1) win, (3,2) win, (2,1) win, (2,2) tie -> 3.5 of 4
    assert auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)
    assert auc([0.0], [1.0]) == 0.0
