"""Timing shared by the benchmarks: several ways of doing one thing, alternated so that they see the same load."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def alternated_ms(ways: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median milliseconds of each way over `reps` rounds, each round running every way once in turn."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(reps):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(ms) for name, ms in times.items()}
