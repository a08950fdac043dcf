"""Side experiments behind the README's findings; each module's docstring gives its command."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def steps_for_budget(probe_step: Callable[[int], object], budget_s: float, probe: int = 8,
                     sync: Callable[[], None] = lambda: None) -> tuple[int, float]:
    """How many steps fit in `budget_s` seconds, from `probe` timed calls of `probe_step(i)`.

    `probe_step` should train a throwaway copy: the real run needs its step count before its first step,
    because the learning-rate schedule depends on it. The first two calls warm up; the median of the rest
    is the step time. Returns (steps, seconds per step); at least 1 step.
    """
    if probe < 3:
        raise ValueError(f"probe must be at least 3 (two warm-up calls and one timed), got {probe}")
    times = []
    for i in range(probe):
        sync()
        t0 = time.perf_counter()
        probe_step(i)
        sync()
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times[2:])
    return max(1, int(budget_s / per_step)), per_step
