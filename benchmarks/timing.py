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


class PeakResident:
    """`with PeakResident() as p: ...`: the block's peak resident memory above its start (`p.extra`, bytes, sampled
    every millisecond) and its wall time (`p.seconds`)."""

    def __enter__(self) -> "PeakResident":
        import threading

        import psutil

        proc, self._done = psutil.Process(), threading.Event()
        self.before = self.peak = proc.memory_info().rss

        def sample() -> None:
            while not self._done.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._done.set()
        self._thread.join()
        self.extra = self.peak - self.before
