"""Statistics of the tables: per-fold values of two initialisations compared.

The unit of observation is one fold (or trial): its mean Dice over test cases.
The paper reports mean ± standard deviation over five folds/trials and an
"independent two sample t-test between the SAR vs. others". Here:

* :func:`mean_std` - mean and *sample* standard deviation (ddof = 1);
* :func:`ttest` - ``scipy.stats.ttest_ind``; Welch's variant (``equal_var=False``)
  by default because the paper does not say which and its standard deviations
  differ up to 2.5-fold between methods (``report.ttest_equal_var: true`` gives
  Student's test);
* :func:`bootstrap_ci` - percentile bootstrap CI of ``mean(reference) - mean(other)``,
  both samples resampled independently (matching the independent-samples test),
  by ``scipy.stats.bootstrap`` with a seeded generator, so a table is
  reproducible bit for bit.

Fewer than two values on either side give NaN rather than a number that means nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Comparison:
    """Reference vs other over folds: difference of means, t-test p-value, bootstrap CI."""

    mean_diff: float
    p_value: float
    ci_low: float
    ci_high: float
    n_reference: int
    n_other: int


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof = 1; NaN for one value) and count of the finite values."""
    x = _finite(values)
    if len(x) == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan, len(x)


def ttest(reference: Sequence[float], other: Sequence[float], equal_var: bool = False) -> float:
    """Two-sided two-sample t-test p-value (Welch unless ``equal_var``); NaN with < 2 values a side."""
    a, b = _finite(reference), _finite(other)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=equal_var).pvalue)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def bootstrap_ci(
    reference: Sequence[float], other: Sequence[float], seed: int, n_resamples: int = 10000,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``mean(reference) - mean(other)``; NaN with < 2 values a side."""
    a, b = _finite(reference), _finite(other)
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    res = stats.bootstrap(
        (a, b), _mean_difference, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
        paired=False, vectorized=True, rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def compare(
    reference: Sequence[float], other: Sequence[float], seed: int, equal_var: bool = False,
    n_resamples: int = 10000, confidence: float = 0.95,
) -> Comparison:
    """Everything the tables report about reference vs other."""
    a, b = _finite(reference), _finite(other)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    low, high = bootstrap_ci(a, b, seed, n_resamples, confidence)
    return Comparison(diff, ttest(a, b, equal_var), low, high, len(a), len(b))


def compare_as_configured(config: Mapping[str, Any], reference: Sequence[float], other: Sequence[float],
                          seed: int) -> Comparison:
    """:func:`compare` with the test, resamples and confidence of ``report`` in the study config."""
    rcfg = config["report"]
    return compare(reference, other, seed, equal_var=rcfg["ttest_equal_var"], n_resamples=rcfg["bootstrap_samples"],
                   confidence=rcfg["confidence"])
