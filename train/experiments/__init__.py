"""Side experiments behind the README's findings; each module's docstring gives its command."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def plain_step(module, optimizer, params: list, batches: dict[str, list], weights: dict[str, float],
               generator: torch.Generator, grad_clip: float) -> dict[str, float]:
    """One optimizer step outside accelerate (the experiments' side-by-side runs); returns the task losses.
    The same order as the training loop: losses, backward, clip (when set), step, zero."""
    loss, parts = module(batches, weights, generator)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts


def device_sync(device: torch.device) -> Callable[[], None]:
    """What to call around a timed step on `device`: CUDA runs asynchronously, the CPU does not."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_step_time(step: Callable[[int], object], probe: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds of `step(i)` over `probe` calls, the first two of which warm up and are not counted."""
    if probe < 3:
        raise ValueError(f"probe must be at least 3 (two warm-up calls and one timed), got {probe}")
    times = []
    for i in range(probe):
        sync()
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def steps_for_budget(probe_step: Callable[[int], object], budget_s: float, probe: int = 8,
                     sync: Callable[[], None] = lambda: None) -> tuple[int, float]:
    """How many steps fit in `budget_s` seconds, from `probe` timed calls of `probe_step(i)`.

    `probe_step` should train a throwaway copy: the real run needs its step count before its first step,
    because the learning-rate schedule depends on it. Returns (steps, seconds per step); at least 1 step.
    """
    per_step = median_step_time(probe_step, probe, sync)
    return max(1, int(budget_s / per_step)), per_step
