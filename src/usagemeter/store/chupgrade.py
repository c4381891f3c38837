"""Tables folded from the events that a database may have had events before (the hour table
with dimension and tag sets, chschema.HOUR_SETS; the hour table of values,
chschema.HOUR_VALUES; each dimension's values with their hours, chschema.DISTINCT_VALUES; on
a database made before round 14, its distinct-count states per hour, chschema.DISTINCT,
should its backfill be unfinished; and on a database of round 8, its latest values per hour,
chschema.LEGACY_LATEST, should a process of round 8 have begun its backfill): each created
beside the running ingest, backfilled once, and read by the planner only when complete.
Each table goes through the same steps on its own boundary.

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

The backfill runs in a thread of the store once due, a UTC month of events at a time (one
INSERT ... SELECT each, so no statement folds the whole history at once), holding the
store's corrections lock: appends go on beside it, and no void or account deletion of this
process refolds or deletes cells meanwhile. It is claimed by creating a table named after
B (a CREATE without ``IF NOT EXISTS`` succeeds once), which receives a row when the backfill
is complete; other processes wait for that row. Closing the store lets a backfill it began
finish. A process that dies in the middle leaves the claim without its row: the planner
then keeps reading the tables it read before (correct, slower) until that table is rebuilt
(``DROP`` the table, its view and the claim; the next start creates them again).
"""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime

from usagemeter.store.chschema import HOUR_SETS, backfill, backfilled_view, fold_select
from usagemeter.store.chtransport import Transport, literal

SETTLE_NS = 30 * 1_000_000_000
"""The allowance for clock differences between processes and for a batch in flight."""
CHECK_EVERY = 1.0  # seconds between looks at another process's unfinished backfill

_BOUNDARY = re.compile(r"seq >= (\d+)")


class Backfilled:
    """Whether ``table`` (one chschema.fold_select folds) may be read, and its backfill.
    ``corrections`` is the store's lock of voids and deletions: the backfill holds it
    (module docstring). ``keyed_latest``: the database's layout of the latest value in the
    tables of sets (chschema.latest_keyed). ``view``: False on a database that folds its
    rollups after the acknowledgement (chfold.py), which has no view and nothing to backfill."""

    def __init__(
        self,
        transport: Transport,
        corrections: threading.Lock,
        fresh: bool,
        table: str,
        keyed_latest: bool = True,
        view: bool = True,
    ) -> None:
        self.table = table
        self.transport = transport
        self._corrections = corrections
        self._keyed_latest = keyed_latest
        if view:
            boundary = 0 if fresh else time.time_ns() + SETTLE_NS
            transport.command(backfilled_view(table, boundary, keyed_latest))
            self.boundary = self._read_boundary()
        else:  # a database folding later (chfold.py): folded from its first event, no view
            self.boundary = 0
        self.complete = self.boundary == 0 or self._finished()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.complete:
            self._thread = threading.Thread(target=self._complete, daemon=True)
            self._thread.start()

    def _read_boundary(self) -> int:
        rows = self.transport.query(
            "SELECT create_table_query FROM system.tables"
            f" WHERE database = currentDatabase() AND name = {literal(self.table + '_mv')}"
        )
        found = _BOUNDARY.search(str(rows[0][0])) if rows else None
        if found is None:
            raise RuntimeError(f"the view {self.table}_mv names no boundary; drop it to rebuild it")
        return int(found.group(1))

    def _claim_table(self) -> str:
        return f"{self.table}_backfill_{self.boundary}"

    def ready(self) -> bool:
        """Whether the table holds every event, so that the planner may read it."""
        return self.complete

    def close(self) -> None:
        """Stop waiting; a backfill in progress finishes first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _complete(self) -> None:
        due = (self.boundary + SETTLE_NS - time.time_ns()) / 1e9
        if self._stop.wait(max(due, 0.0)):
            return
        with self._corrections:
            if self._finished():
                self.complete = True
            elif self._claim():
                self.complete = self._backfill()
        while not self.complete and not self._stop.wait(CHECK_EVERY):
            self.complete = self._finished()  # another process's backfill

    def _claimed(self) -> bool:
        exists = self.transport.query(
            "SELECT count() FROM system.tables WHERE database = currentDatabase()"
            f" AND name = {literal(self._claim_table())}"
        )
        return bool(exists and exists[0][0])

    def _finished(self) -> bool:
        if not self._claimed():
            return False
        rows = self.transport.query(f"SELECT count() FROM {self._claim_table()}")
        return bool(rows and rows[0][0])

    def _claim(self) -> bool:
        try:
            self.transport.command(
                f"CREATE TABLE {self._claim_table()} (done UInt8)"
                " ENGINE = MergeTree ORDER BY tuple()"
            )
        except Exception:  # each transport raises its own error
            if self._claimed():  # another process was first: it backfills
                return False
            raise
        return True

    def _backfill(self) -> bool:
        rows = self.transport.query(
            f"SELECT min(ts), max(ts) FROM events WHERE seq < {self.boundary} HAVING count() > 0"
        )
        if rows:
            # Not stopped by close(): a claimed backfill left halfway could never be told
            # from one in progress, and the table would stay unread. A month takes seconds.
            for lo, hi in _months(int(rows[0][0]), int(rows[0][1])):
                self.transport.command(
                    backfill(self.table, self.boundary, lo, hi, self._keyed_latest)
                )
        self.transport.command(f"INSERT INTO {self._claim_table()} VALUES (1)")
        return True

    def refold_filter(self) -> str:
        """What a void's refold of the table reads of the events: until the backfill is
        complete, only what the view counts (the backfill brings the rest). Voids hold the
        corrections lock, so the backfill is not halfway meanwhile."""
        return "" if self.complete else f" AND seq >= {self.boundary}"


def _months(first_ms: int, last_ms: int) -> list[tuple[int, int]]:
    """The UTC months [start, end) in ms from the one holding ``first_ms`` to the one
    holding ``last_ms``."""
    day = datetime.fromtimestamp(first_ms // 1000, UTC)
    month = datetime(day.year, day.month, 1, tzinfo=UTC)
    months = []
    while int(month.timestamp() * 1000) <= last_ms:
        following = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
        months.append((int(month.timestamp() * 1000), int(following.timestamp() * 1000)))
        month = following
    return months


# The tables of sets' views as databases before round 12 made them: the dimensions and tags
# folded by any() (chschema._sets_select now groups by them). Kept to recognise such a
# database, and to make one where the upgrade is checked (its test, bench.chturns
# --sets-views).
SETS_SELECT_BEFORE_ROUND_12 = """
SELECT account, metric, intDiv(ts - positiveModulo(ts, {unit}), {unit}) AS slot, key, billable,
       dimset, tagset, any(dims) AS dims, any(tags) AS tags, count() AS cnt,
       sum(value) AS total, min(value) AS vmin, max(value) AS vmax,
       argMaxState(value, (ts, seq)) AS last
FROM events{where} GROUP BY account, metric, slot, key, billable, dimset, tagset
"""
_FOLDED_BY_ANY = "any(dims)"


def make_sets_views_before_round_12(transport: Transport, hour_sets_boundary: int) -> None:
    """Give a database the tables of sets' views as before round 12, the hour sets' view
    from ``hour_sets_boundary``: what ``regroup_sets_views`` finds in an older database."""
    for table, unit, where in (
        ("rollup", 900_000, ""),
        (HOUR_SETS, 3_600_000, f" WHERE seq >= {int(hour_sets_boundary)}"),
    ):
        transport.command(f"DROP VIEW {table}_mv")
        transport.command(
            f"CREATE MATERIALIZED VIEW {table}_mv TO {table} AS"
            + SETS_SELECT_BEFORE_ROUND_12.format(unit=unit, where=where)
        )


def regroup_sets_views(
    transport: Transport, hour_sets_boundary: int, keyed_latest: bool = False
) -> list[str]:
    """Give a database created before round 12 the tables of sets' views of this version
    (chschema._sets_select: the dimensions and tags grouped by, not folded by any(), 1.1 to
    1.2 times the rate of an append), in place: ``ALTER TABLE ... MODIFY QUERY`` swaps a
    view's SELECT for the inserts that follow, so no insert goes uncounted, as one between a
    DROP and a CREATE would. Both SELECTs make the same cells, so inserts of an older process
    and of this one may interleave. The hour sets' view keeps its boundary. A server that
    refuses the ALTER (older ClickHouse kept it behind an experimental setting) keeps its
    views as they are: the same rows, at the old cost. ``keyed_latest``: the database's
    latest-value layout (chschema.latest_keyed: such a database keeps the tuple). Returns
    the views changed."""
    names = literal("rollup_mv") + ", " + literal(f"{HOUR_SETS}_mv")
    rows = transport.query(
        "SELECT name, create_table_query FROM system.tables"
        f" WHERE database = currentDatabase() AND name IN ({names})"
    )
    changed = []
    for name, query in rows:
        if _FOLDED_BY_ANY not in str(query):
            continue
        table = name.removesuffix("_mv")
        where = f" WHERE seq >= {int(hour_sets_boundary)}" if table == HOUR_SETS else ""
        try:
            transport.command(
                f"ALTER TABLE {name} MODIFY QUERY"
                + fold_select(table, "events", where, keyed_latest)
            )
        except Exception:  # each transport raises its own error; the old view still works
            continue
        changed.append(name)
    return changed
