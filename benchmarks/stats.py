"""Latency statistics. Percentiles use linear interpolation between order statistics
(numpy's default, 'linear'): for 1..100, the median is 50.5 and p90 is 90.1."""

from __future__ import annotations

import numpy as np


def percentile(samples, q: float) -> float:
    x = np.sort(np.asarray(samples, dtype=np.float64))
    if x.size == 0:
        raise ValueError("no samples")
    pos = (x.size - 1) * q / 100.0
    lo = int(np.floor(pos))
    hi = min(lo + 1, x.size - 1)
    return float(x[lo] + (x[hi] - x[lo]) * (pos - lo))


def summarize(samples) -> dict:
    """median, p90, p95, p99, min, max, mean and count of a list of numbers."""
    x = np.asarray(samples, dtype=np.float64)
    return {
        "median": percentile(x, 50),
        "p90": percentile(x, 90),
        "p95": percentile(x, 95),
        "p99": percentile(x, 99),
        "min": float(x.min()),
        "max": float(x.max()),
        "mean": float(x.mean()),
        "n": int(x.size),
    }
