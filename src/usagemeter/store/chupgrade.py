"""The hour table with dimension and tag sets (chschema.HOUR_SETS) on a database that held
events before it existed: created beside the running ingest, backfilled once, and read by the
planner only when complete.

ClickHouse has no transactions and no lock that processes could share, and a process of an
older version (which knows nothing of this table) may be ingesting meanwhile. So the table's
events are split by one number, the boundary B, which is part of the view's definition:

- the view counts the events with ``seq >= B``, as each insert lands;
- the backfill counts the events with ``seq < B``, once, in one INSERT ... SELECT.

An event has one ``seq``, so no event is counted by both. None is counted by neither when
(1) every event with ``seq >= B`` is inserted after the view exists, and (2) every event with
``seq < B`` is stored before the backfill reads. A store stamps a batch's ``seq`` from its
clock (nanoseconds) just before inserting it, in every version. B is the creating process's
clock plus ``SETTLE_NS``, and the backfill runs once the clock has passed B + ``SETTLE_NS``:
(1) holds while the processes' clocks differ by less than ``SETTLE_NS``; (2) holds while a
batch takes less than ``SETTLE_NS`` from its stamp to its stored parts (an insert takes well
under a second). In one chDB process, whose statements take turns, both hold at once.

A database created by this version gets B = 0: the view exists before any event, and there
is nothing to backfill. The views are created ``IF NOT EXISTS``: of two processes upgrading
together, the first view wins, and both read B back from its definition.

The backfill is claimed by creating a table named after B (a CREATE without ``IF NOT
EXISTS`` succeeds once), which receives a row when the backfill is complete. A process that
dies in the middle leaves the claim without its row: the planner then keeps reading the
slots (correct, slower) until the hour table is dropped and rebuilt (``DROP TABLE`` of the
table, its view and the claim; the next start creates them again).
"""

from __future__ import annotations

import re
import threading
import time

from usagemeter.store.chschema import HOUR_SETS, hour_sets_backfill, hour_sets_view
from usagemeter.store.chtransport import Transport, literal

SETTLE_NS = 30 * 1_000_000_000
"""The allowance for clock differences between processes and for a batch in flight."""
CHECK_EVERY = 1.0  # seconds between looks at another process's unfinished backfill

_VIEW = f"{HOUR_SETS}_mv"
_BOUNDARY = re.compile(r"seq >= (\d+)")


def _claim_table(boundary: int) -> str:
    return f"{HOUR_SETS}_backfill_{boundary}"


class HourSets:
    """Whether the hour table may be read, and its backfill. ``lock`` is the store's process
    lock: the backfill holds it, so no void of this process refolds cells meanwhile."""

    def __init__(self, transport: Transport, lock: threading.Lock, fresh: bool) -> None:
        self.transport = transport
        self._lock = lock
        transport.command(hour_sets_view(0 if fresh else time.time_ns() + SETTLE_NS))
        self.boundary = self._read_boundary()
        self.complete = self.boundary == 0
        self._checked = 0.0

    def _read_boundary(self) -> int:
        rows = self.transport.query(
            "SELECT create_table_query FROM system.tables"
            f" WHERE database = currentDatabase() AND name = {literal(_VIEW)}"
        )
        found = _BOUNDARY.search(str(rows[0][0])) if rows else None
        if found is None:
            raise RuntimeError(f"the view {_VIEW} names no boundary; drop it to rebuild it")
        return int(found.group(1))

    def ready(self) -> bool:
        """Whether the table holds every event; backfills it when that is due and unclaimed."""
        if self.complete:
            return True
        if time.time_ns() < self.boundary + SETTLE_NS or (
            time.monotonic() - self._checked < CHECK_EVERY
        ):
            return False
        with self._lock:
            self._checked = time.monotonic()
            if not self.complete:
                self.complete = self._finished() or (self._claim() and self._backfill())
        return self.complete

    def _claimed(self) -> bool:
        exists = self.transport.query(
            "SELECT count() FROM system.tables WHERE database = currentDatabase()"
            f" AND name = {literal(_claim_table(self.boundary))}"
        )
        return bool(exists and exists[0][0])

    def _finished(self) -> bool:
        if not self._claimed():
            return False
        rows = self.transport.query(f"SELECT count() FROM {_claim_table(self.boundary)}")
        return bool(rows and rows[0][0])

    def _claim(self) -> bool:
        try:
            self.transport.command(
                f"CREATE TABLE {_claim_table(self.boundary)} (done UInt8)"
                " ENGINE = MergeTree ORDER BY tuple()"
            )
        except Exception:  # each transport raises its own error
            if self._claimed():  # another process was first: it backfills
                return False
            raise
        return True

    def _backfill(self) -> bool:
        self.transport.command(hour_sets_backfill(self.boundary))
        self.transport.command(f"INSERT INTO {_claim_table(self.boundary)} VALUES (1)")
        return True

    def refold_filter(self) -> str:
        """What a void's refold of the hour table reads of the events: until the backfill is
        complete, only what the view counts (the backfill brings the rest)."""
        return "" if self.complete else f" AND seq >= {self.boundary}"
