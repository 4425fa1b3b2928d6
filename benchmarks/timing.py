"""The one way benchmarks time a call."""
from __future__ import annotations

import time

import numpy as np


def median_ms(fn, repeats: int = 5) -> float:
    """Median wall time of `fn` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000
