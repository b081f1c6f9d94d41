"""Order statistics for timings: medians and p99 by nearest rank, no numpy."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100): a value that was really measured, never interpolated."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summary_us(ns: Sequence[int | float]) -> dict[str, float]:
    """Median and p99 in microseconds of timings given in nanoseconds."""
    return {
        "median_us": median(ns) / 1000.0,
        "p99_us": percentile(ns, 99) / 1000.0,
        "n": len(ns),
    }


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan
