"""Small timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def sample_times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall time of each of `repeats` runs of `fn()` in seconds, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs, after `warmup` runs."""
    return statistics.median(sample_times(fn, repeats, warmup))
