"""Summaries of per-repetition timing ratios shared by the overhead benchmarks."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return q1, statistics.median(xs), q3


def median_ci(xs: Sequence[float], level: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median: how precisely the run pins the median ratio down
    (the IQR says how much single steps spread)."""
    x = np.asarray(xs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    lo, hi = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
