"""Timing helpers every benchmark shares: CUDA-synchronised wall clock, median of repeats after a warm-up."""

from __future__ import annotations

import statistics
import time

__all__ = ["median_time", "sync"]


def sync(device: str) -> None:
    """Wait for queued CUDA work on ``device`` to finish (a no-op on the CPU), so a timer measures the work."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median_time(fn, repeats: int, before=None, device: str = "cpu") -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call.

    ``before`` (if given) runs ahead of every call, outside the timer (e.g. to clear a cache for a cold run).
    """
    times = []
    for i in range(repeats + 1):
        if before is not None:
            before()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
