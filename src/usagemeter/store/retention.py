"""Retention: raw events older than N days are dropped, their rollups kept (issue 18).

Rollups answer count, sum, min, max and latest over any range whose ends fall on 15-minute
boundaries, at any grain and for any group-by or filter (the 15-minute slots keep every
dimension and tag set). Two questions need the raw events themselves: a distinct count
(``unique_count``), and a range end that is not on a 15-minute boundary (the partial slot is
read from raw events). Before the horizon those are refused with ``RawDropped`` (a 409 over
HTTP) rather than answered with a silently wrong number.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from usagemeter.corrections import RawDropped
from usagemeter.store.base import AggregateSpec, Store
from usagemeter.store.sqlplan import DAY_MS, grains_for, split_windows
from usagemeter.timewindows import from_ms, isoformat

log = logging.getLogger("usagemeter")
RETAIN_EVERY_SECONDS = 3600.0  # how often serve's job drops what has aged out


def check_raw(spec: AggregateSpec, horizon_ms: int | None) -> None:
    """Raise RawDropped if answering ``spec`` exactly needs raw events before the horizon."""
    if horizon_ms is None:
        return
    early = [w for w in spec.windows if w.start_ms < horizon_ms]
    if not early:
        return
    since = isoformat(from_ms(horizon_ms))
    if any(m.aggregation == "unique_count" for m in spec.measures):
        raise RawDropped(
            f"a distinct count is counted over raw events, which are kept from {since} on"
            " (older ones were dropped by retention): start the range then or later"
        )
    _, raw = split_windows(early, grains_for(spec))
    if any(lo < horizon_ms for _, lo, _ in raw):
        raise RawDropped(
            f"before {since} only rollups remain (raw events were dropped by retention), and"
            " they answer ranges whose ends fall on 15-minute boundaries: round the range's"
            " ends to a quarter hour, or start it then or later"
        )


def cutoff(now_ms: int, days: int) -> int:
    """The horizon that keeps ``days`` whole days of raw events before now."""
    if days < 1:
        raise ValueError("retain-raw-days: keep at least 1 day of raw events")
    return now_ms - days * DAY_MS


class RetentionJob:
    """Serve's periodic retention: every RETAIN_EVERY_SECONDS, drop raw events older than
    ``days`` days, on a daemon thread."""

    def __init__(
        self,
        store: Store,
        days: int,
        now_ms: Callable[[], int],
        every: float = RETAIN_EVERY_SECONDS,
    ) -> None:
        cutoff(now_ms(), days)  # a bad setting fails at start, not an hour later
        self.store, self.days, self.now_ms, self.every = store, days, now_ms, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="retention")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def run_once(self) -> int:
        dropped = self.store.retain(cutoff(self.now_ms(), self.days))
        if dropped:
            log.info("retention dropped %s raw events older than %s days", dropped, self.days)
        return dropped

    def _loop(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:  # the next round tries again
                log.exception("retention failed")
            if self._stop.wait(self.every):
                return
