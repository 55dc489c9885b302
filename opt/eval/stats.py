"""The numbers of the T0 view: a bootstrap interval for each prompt's accuracy, and the
spread of accuracy over the prompts of a task."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def bootstrap_ci(
    values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (per-example 0/1 outcomes):
    ``resamples`` resamples of the examples with replacement, from a generator seeded
    with ``seed``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def spread(values: Sequence[float]) -> dict:
    """Median, quartiles, interquartile range, min and max (numpy's linear quantiles)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {k: float("nan") for k in ("median", "q25", "q75", "iqr", "min", "max")}
    q25, median, q75 = np.percentile(x, [25, 50, 75])
    return {
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "iqr": float(q75 - q25),
        "min": float(x.min()),
        "max": float(x.max()),
    }
