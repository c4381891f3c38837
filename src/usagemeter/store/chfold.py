"""The rollups folded after the acknowledgement: the mode a ClickHouse database may be created
in (``?fold=later``), where no view folds the rollups inside the INSERT.

Why: an append's INSERT ran every rollup's view under the writer's lock, three to four times
the work of the events and their ids (docs/clickhouse.md, "Ingest, round 10"). Here the
INSERT stores the events and their ids (``event_ids``' view stays: dedupe needs them at
once), and the rollups are filled afterwards from each unit's events, by each table's own
chschema.fold_select (below).

- **Units.** Each INSERT of events is a unit: the writing process's id (``writer``, random,
  stamped on its events) and its range of seq (increasing within a process). A view on the
  events logs it in ``fold_units`` as part of the INSERT, so a unit is logged exactly when
  its events are stored, and an INSERT dropped as a duplicate (its token) logs none.
- **One statement.** A unit is folded into every rollup by one INSERT of its events into
  ``fold_feed`` (a Null table: it keeps nothing), on which a view per rollup runs that
  table's fold_select, side by side (parallel_view_processing), as the view mode's views do
  inside an append's INSERT: four statements one after the other took about twice as long.
- **Exactly once.** The INSERT is one block (max_insert_threads = 1, the squashing bounds
  lifted: one part per rollup, checked by the tests) carrying the token of the unit, from
  which the engine derives each view's own (deduplicate_blocks_in_dependent_materialized_views):
  a second fold of the unit, by this process after a crash or by another at the same moment,
  is dropped by each rollup's deduplication window (the last 10,000 inserts,
  chschema._TOKENS), and the redo of a fold that a crash cut short after some tables writes
  the others alone. Once folded, a row in ``fold_done`` (with its own token) marks the unit.
- **Read-your-writes.** Before a question, and before a void, a retention or a deletion
  (which refold from, or drop, the events), the store folds every unit not marked (the
  barrier). Whether one waits is two counts of small tables (``count()`` from the parts'
  metadata); the units themselves are listed only when the counts differ.
- **When.** A thread of each writing process folds its units once no append of the process
  is in flight, a unit at a time, and lets appends go first between units: the
  acknowledgement never waits for a fold it did not ask for; a question during a burst
  waits for the fold of what came before it.

The mode is the database's: ``fold_units`` exists from its creation on, and every process
that opens it reads that, whatever its URL says; a database with the rollups' views never
gets the table, and a process refuses one that has both (two processes that created the
same database at once with different options).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from usagemeter.store.chschema import FOLD_DONE, FOLD_FEED, FOLD_UNITS
from usagemeter.store.chtransport import Transport, literal

log = logging.getLogger(__name__)

Unit = tuple[int, int, int]  # (writer, seq_from, seq_to)

POLL_S = 1.0
"""How often the fold thread looks for units it was not told of (another process's, one a
process left when it stopped)."""
QUIET_S = 0.02
"""How long the fold thread waits between looks at whether an append is still in flight."""

# One block per fold, so that one token names it whole; no merge of the block's own rows
# (every fold_select already groups by its table's key); and the deduplication the token
# relies on, whatever the session's default.
_ONE_BLOCK = (
    "insert_deduplicate = 1, max_insert_threads = 1, optimize_on_insert = 0,"
    " min_insert_block_size_rows = 1000000000000, min_insert_block_size_bytes = 1000000000000"
)


# The feed's views: each rollup drops a block of a unit it holds (the token the engine derives
# from the unit's for each view), and the views run side by side.
_IN_VIEWS = "deduplicate_blocks_in_dependent_materialized_views = 1, parallel_view_processing = 1"


def fold_token(table: str, unit: Unit) -> str:
    writer, seq_from, seq_to = unit
    return f"fold-{table}-{writer}-{seq_from}-{seq_to}"


def _unit_events(unit: Unit) -> str:
    writer, seq_from, seq_to = unit
    return f" WHERE writer = {writer} AND seq >= {seq_from} AND seq <= {seq_to}"


def feed_statement(unit: Unit, columns: str) -> str:
    """The INSERT that folds ``unit``'s events into every rollup at once, exactly once:
    ``columns``, the feed's, are selected from the events."""
    token = literal(fold_token(FOLD_FEED, unit))
    return (
        f"INSERT INTO {FOLD_FEED} SETTINGS insert_deduplication_token = {token}, {_ONE_BLOCK},"
        f" {_IN_VIEWS} SELECT {columns} FROM events" + _unit_events(unit)
    )


class Folder:
    """The folds of one store on a database folding later. ``busy`` tells whether an append
    of this process is in flight (the thread's folds wait for it)."""

    def __init__(self, transport: Transport, busy: Callable[[], bool]) -> None:
        self.transport = transport
        self.writer = secrets.randbits(63) | 1  # never 0: 0 is an amend's replacement
        self._busy = busy
        self._feed_columns = ", ".join(
            str(row[0])
            for row in transport.query(
                "SELECT name FROM system.columns WHERE database = currentDatabase()"
                f" AND table = {literal(FOLD_FEED)} ORDER BY position"
            )
        )
        # One fold at a time in this process: the thread's, a question's barrier, a void's.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chfold", daemon=True)
        self._thread.start()

    def wrote(self) -> None:
        """An append of this process stored a unit: the thread folds it once quiet."""
        self._wake.set()

    def close(self) -> None:
        """Stop the thread (after its statement under way). What waits stays in the log: the
        next question, from any process, folds it."""
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def waiting(self) -> list[Unit]:
        """The units stored and not marked folded, oldest first."""
        counts = self.transport.query(
            f"SELECT (SELECT count() FROM {FOLD_UNITS}), (SELECT count() FROM {FOLD_DONE})"
        )
        if not counts or int(counts[0][0]) <= int(counts[0][1]):
            return []
        rows = self.transport.query(
            f"SELECT writer, seq_from, seq_to FROM {FOLD_UNITS}"
            f" WHERE (writer, seq_from) NOT IN (SELECT writer, seq_from FROM {FOLD_DONE})"
            " ORDER BY seq_from, writer"
        )
        return [(int(w), int(lo), int(hi)) for w, lo, hi in rows]

    def fold_waiting(self) -> int:
        """The barrier: every unit waiting is folded when this returns. The units folded."""
        with self._lock:
            return self._fold_all(None)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Every unit waiting folded, and no fold of this process until the block ends: a
        void refolds cells from the events, which a unit's fold must neither precede
        unseen nor follow."""
        with self._lock:
            self._fold_all(None)
            yield

    def fold_unit(self, unit: Unit, mark: bool = True) -> None:
        """Fold ``unit`` and, when ``mark``, mark it folded (tests fold a unit twice, or
        leave it unmarked as a crash would, this way)."""
        with self._lock:
            self.transport.command(feed_statement(unit, self._feed_columns))
            if mark:
                self._mark(unit)

    def _fold_all(self, yield_to: Callable[[], bool] | None) -> int:
        """Fold what waits (the caller holds the lock); with ``yield_to``, stop as soon as it
        says so, between units. The units folded."""
        folded = 0
        for unit in self.waiting():
            if yield_to is not None and yield_to():
                return folded
            self.transport.command(feed_statement(unit, self._feed_columns))
            self._mark(unit)
            folded += 1
        return folded

    def _mark(self, unit: Unit) -> None:
        writer, seq_from, seq_to = unit
        token = literal(fold_token(FOLD_DONE, unit))
        self.transport.command(
            f"INSERT INTO {FOLD_DONE} SETTINGS insert_deduplication_token = {token}"
            f" SELECT {writer}, {seq_from}, {seq_to}, 0"
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            # Appends first: a burst is acknowledged at the rate of its events alone, and
            # folded once it pauses.
            while self._busy() and not self._stop.is_set():
                time.sleep(QUIET_S)
            if self._stop.is_set():
                return
            try:
                with self._lock:
                    self._fold_all(self._busy)
            except Exception:  # the next look retries; the barrier folds regardless
                log.exception("folding the rollups failed; retried at the next look")
