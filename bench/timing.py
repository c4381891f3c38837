"""Timing: one cold run, then warm runs whose median is the figure reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timing:
    cold: float  # seconds
    warm: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.warm) if self.warm else self.cold


def measure(fn: Callable[[], Any], warm_runs: int) -> tuple[Timing, Any]:
    """Time `fn` once cold and `warm_runs` times warm; the first run's result with it."""
    t0 = time.perf_counter()
    first = fn()
    timing = Timing(cold=time.perf_counter() - t0)
    for _ in range(warm_runs):
        t0 = time.perf_counter()
        fn()
        timing.warm.append(time.perf_counter() - t0)
    return timing, first
