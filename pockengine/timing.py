"""Timing a step: the one loop every measurement here uses (benchmarks, backend choice, Program.time_step)."""

from __future__ import annotations

import statistics
import time


def median_ms(step, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `repeats` calls of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
