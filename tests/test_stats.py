"""Statistics on known inputs: mean/std, the t-test against scipy and by hand, the seeded bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from sar3d.reporting.stats import bootstrap_ci, compare, mean_std, ttest

SAR = [84.0, 86.0, 83.0, 88.0, 85.0]
SCRATCH = [74.0, 70.0, 79.0, 72.0, 76.0]


def test_mean_and_sample_std():
    mean, std, n = mean_std([1.0, 2.0, 3.0, 4.0, math.nan])
    assert (mean, n) == (2.5, 4)
    assert std == pytest.approx(math.sqrt(5 / 3))  # sum of squares 5, n - 1 = 3
    assert math.isnan(mean_std([7.0])[1]) and mean_std([7.0])[0] == 7.0
    assert mean_std([])[2] == 0


def test_welch_t_test_by_hand_and_student_from_scipy():
    a, b = np.array(SAR), np.array(SCRATCH)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    assert ttest(SAR, SCRATCH) == pytest.approx(2 * sps.t.sf(abs(t), df))
    assert ttest(SAR, SCRATCH, equal_var=True) == pytest.approx(sps.ttest_ind(a, b).pvalue)
    assert ttest(SAR, SCRATCH) != pytest.approx(ttest(SAR, SCRATCH, equal_var=True))
    assert math.isnan(ttest([1.0], SCRATCH))  # one fold says nothing about variance


def test_bootstrap_is_seeded_and_sensible():
    low, high = bootstrap_ci(SAR, SCRATCH, seed=7, n_resamples=2000)
    assert (low, high) == bootstrap_ci(SAR, SCRATCH, seed=7, n_resamples=2000)  # reproducible
    noisy_a, noisy_b = np.random.default_rng(1).normal(80, 3, (2, 6))  # continuous: CI bounds move with the seed
    assert bootstrap_ci(noisy_a, noisy_b, seed=7) != bootstrap_ci(noisy_a, noisy_b, seed=8)
    diff = np.mean(SAR) - np.mean(SCRATCH)
    assert low < diff < high
    # an independent numpy percentile bootstrap agrees within resampling noise
    rng = np.random.default_rng(0)
    a, b = np.array(SAR), np.array(SCRATCH)
    boots = [rng.choice(a, len(a)).mean() - rng.choice(b, len(b)).mean() for _ in range(20000)]
    assert low == pytest.approx(np.percentile(boots, 2.5), abs=0.4)
    assert high == pytest.approx(np.percentile(boots, 97.5), abs=0.4)
    # a constant shift without spread has a degenerate interval at the shift
    assert bootstrap_ci([5.0, 5.0, 5.0], [2.0, 2.0, 2.0], seed=1, n_resamples=500) == pytest.approx((3.0, 3.0))
    assert all(math.isnan(x) for x in bootstrap_ci([1.0], SCRATCH, seed=1))


def test_compare_bundles_everything():
    cmp = compare(SAR, [*SCRATCH, math.nan], seed=3, n_resamples=1000)
    assert cmp.mean_diff == pytest.approx(np.mean(SAR) - np.mean(SCRATCH))
    assert cmp.p_value == pytest.approx(ttest(SAR, SCRATCH))
    assert (cmp.ci_low, cmp.ci_high) == bootstrap_ci(SAR, SCRATCH, seed=3, n_resamples=1000)
    assert (cmp.n_reference, cmp.n_other) == (5, 5)
