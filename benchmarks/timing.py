"""Wall-clock timing shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """The median of ``reps`` timed calls of ``fn``, after one untimed call (warm-up, compilation)."""
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
