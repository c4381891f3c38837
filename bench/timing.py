"""Timing: one cold run, then warm runs whose median is the figure reported."""

from __future__ import annotations

import statistics
import threading
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


def in_threads(work: Callable[[], None], threads: int) -> float:
    """Seconds for ``threads`` threads to run ``work`` at once, each until it returns; the
    first exception any raised is raised again here, once all have stopped."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # raised in the caller's thread below
            failures.append(exc)

    started = [threading.Thread(target=run) for _ in range(threads)]
    began = time.perf_counter()
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    seconds = time.perf_counter() - began
    if failures:
        raise failures[0]
    return seconds
