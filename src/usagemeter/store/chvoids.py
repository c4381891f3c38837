"""Voids, amends, retention and account deletion on the ClickHouse store.

ClickHouse has no transactions, so a void is ordered to be exact at every step a reader
might see, and run under the store's process lock (which every append of this process also
holds, so no batch of this process lands in the middle) and its corrections lock (which the
hour table's backfill holds, chupgrade.py):

1. an amend's replacement is inserted (a copy of the event with the new id and value; the
   views fold it into the rollups and the id into ``event_ids``, as for any insert);
2. the voided events are deleted (``DELETE FROM``: a lightweight delete, synchronous, which
   masks the rows at once and drops them at the next merge);
3. the rollup rows of every affected (account, metric, UTC day) are deleted, and the same
   cells folded again from the surviving events with the views' own SELECT.

A reader between steps 2 and 3 may see the old rollups for a moment; after 3 every report is
exact. ``event_ids`` is never touched, so a voided id stays taken. The window left is another
process's batch for the same account landing between steps 3's delete and refold (then
counted twice in that cell): route an account's ingest and corrections to one process
(docs/clickhouse.md), as for dedupe.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from usagemeter.corrections import (
    Amendment,
    VoidRecord,
    VoidSelector,
    days_touched,
    merge_days,
    new_void_id,
)
from usagemeter.model import Event
from usagemeter.store.base import Conflict, NotFound
from usagemeter.store.chschema import (
    DISTINCT_GRAIN,
    DISTINCT_VALUES,
    HOUR_SETS_GRAIN,
    HOUR_VALUES_GRAIN,
    LEGACY_LATEST_GRAIN,
    fold_select,
)
from usagemeter.store.chtransport import Transport, literal, literals
from usagemeter.store.chupgrade import Backfilled
from usagemeter.store.postgres import _digest
from usagemeter.store.sidefile import SideFile
from usagemeter.store.sqlplan import DAY_MS, Grain
from usagemeter.store.voidsql import (
    VoidLog,
    delete_account_rows,
    record_void,
    set_horizon,
)

# Our own inserts are never deduplicated by block hash: a refold may produce the same rows
# as an earlier one, and both must land.
_NO_DEDUPE = "SETTINGS insert_deduplicate = 0"


def delete_rows(transport: Transport, table: str, where: str) -> None:
    """A lightweight delete: synchronous (the rows are gone for every reader when it returns),
    and a mask over the parts rather than a rewrite of them, which an ``ALTER TABLE ...
    DELETE`` mutation is (bench/corrections.py measures both)."""
    transport.command(f"DELETE FROM {table} WHERE {where}")


class ChCorrections(VoidLog):
    """The ClickHouse store's corrections; the record of voids and the retention horizon
    live in its side file."""

    transport: Transport
    side: SideFile
    _lock: threading.Lock
    _corrections: threading.Lock
    hour_sets: Backfilled
    distinct_hours: Backfilled | None
    hour_values: Backfilled
    distinct_values: Backfilled
    legacy_latest: Backfilled | None
    keyed_latest: bool  # the tables of sets' latest-value layout (chschema.latest_keyed)

    def grains(self) -> tuple[Grain, ...]:
        raise NotImplementedError

    def _event_tables(self) -> tuple[str, ...]:
        """The events, their ids, every rollup of this database (chschema.GRAINS, and
        the older tables it kept: LEGACY_GRAINS) and the distinct values."""
        return ("events", "event_ids", *(g.table for g in self.grains()), DISTINCT_VALUES)

    def _require(self, table: str, noun: str, ids: Sequence[str]) -> None:
        raise NotImplementedError

    def descendants(self, account_id: str) -> list[str]:
        raise NotImplementedError

    def _seqs(self, count: int) -> int:
        raise NotImplementedError

    def void_events(
        self,
        selector: VoidSelector,
        reason: str,
        by: str | None,
        now_ms: int,
        amend: Amendment | None = None,
    ) -> VoidRecord:
        selector.validate()
        self._require("accounts", "account", [selector.account_id])
        horizon = self.raw_horizon()
        selector.check_horizon(horizon)
        where = self._selection(selector)
        void_id = new_void_id()
        with self._corrections, self._lock:
            rows = self.transport.query(f"SELECT id, metric, ts FROM events WHERE {where}")
            selector.check_found(
                {row[0] for row in rows},
                lambda missing: self._gone(selector.account_id, missing),
                horizon,
                Conflict,
                NotFound,
            )
            replacement = None
            if amend is not None:
                replacement = self._amend(selector, amend, void_id)
            delete_rows(self.transport, "events", where)
            self._recompute(selector.account_id, days_touched(rows))
            record = VoidRecord(void_id, selector, reason, by, now_ms, len(rows), replacement)
            with self.side._limit_write() as run:
                record_void(run, record)
        return record

    def _selection(self, selector: VoidSelector) -> str:
        where = [f"account = {literal(selector.account_id)}"]
        if selector.ids:
            where.append(f"id IN ({literals(selector.ids)})")
            return " AND ".join(where)
        where.append(f"metric = {literal(selector.metric)}")
        where.append(f"ts >= {int(selector.start_ms or 0)} AND ts < {int(selector.end_ms or 0)}")
        if selector.key_id is not None:
            found = self.transport.query(
                f"SELECT count() FROM keys FINAL WHERE id = {literal(selector.key_id)}"
                f" AND account = {literal(selector.account_id)}"
            )
            if not found or not found[0][0]:
                raise NotFound(
                    f"key {selector.key_id!r} does not exist or is not {selector.account_id!r}'s"
                )
            where.append(f"key = {literal(selector.key_id)}")
        for name, value in selector.dimensions:
            where.append(f"dims[{literal(name)}] = {literal(value)}")
        return " AND ".join(where)

    def _gone(self, account_id: str, ids: Sequence[str]) -> set[str]:
        rows = self.transport.query(
            f"SELECT DISTINCT id FROM event_ids WHERE account = {literal(account_id)}"
            f" AND id IN ({literals(ids)})"
        )
        return {row[0] for row in rows}

    def _amend(self, selector: VoidSelector, amend: Amendment, void_id: str) -> str:
        """Insert the replacement of the one event an amend names; its id."""
        if len(selector.ids) != 1:
            raise ValueError("ids: an amend names exactly one event")
        old_id = selector.ids[0]
        new_id = amend.replacement_id(old_id, void_id)
        account = literal(selector.account_id)
        taken = self.transport.query(
            f"SELECT count() FROM event_ids WHERE account = {account} AND id = {literal(new_id)}"
        )
        if taken and taken[0][0]:
            raise Conflict(f"event id {new_id!r} is already taken in this account")
        row = self.transport.query(
            "SELECT metric, ts, billable, key, dims, tags FROM events"
            f" WHERE account = {account} AND id = {literal(old_id)} LIMIT 1"
        )[0]
        # The same digest as an appended event with these fields would have.
        digest = _digest(
            Event(
                id=new_id,
                account_id=selector.account_id,
                metric=row[0],
                ts_ms=int(row[1]),
                value=amend.value,
                billable=bool(row[2]),
                key_id=row[3] or None,
                dimensions=row[4],
                tags=frozenset(row[5]),
            )
        ).hex()
        self.transport.command(
            "INSERT INTO events (account, metric, ts, id, key, billable, value, dims, tags,"
            f" dimset, tagset, seq, digest) {_NO_DEDUPE} SELECT account, metric, ts,"
            f" {literal(new_id)}, key, billable, {float(amend.value)!r}, dims, tags, dimset,"
            f" tagset, {self._seqs(1)}, {literal(digest)} FROM events"
            f" WHERE account = {account} AND id = {literal(old_id)} LIMIT 1"
        )
        return new_id

    def _recompute(self, account_id: str, days: dict[str, set[int]]) -> None:
        """Delete the rollup rows of the metrics' days and fold them again from events."""
        if not days:
            return
        account = literal(account_id)
        ranges = [
            (metric, first * DAY_MS, last * DAY_MS)
            for metric, metric_days in sorted(days.items())
            for first, last in merge_days(metric_days)
        ]
        events = " OR ".join(
            f"(metric = {literal(m)} AND ts >= {lo} AND ts < {hi})" for m, lo, hi in ranges
        )
        where = f"account = {account} AND ({events})"
        # The tables chupgrade.py backfills count only what their views counted until
        # their backfills are complete: each backfill brings the rest, once.
        backfilled = {HOUR_SETS_GRAIN: self.hour_sets, HOUR_VALUES_GRAIN: self.hour_values}
        if self.distinct_hours is not None:
            backfilled[DISTINCT_GRAIN] = self.distinct_hours
        if self.legacy_latest is not None:
            backfilled[LEGACY_LATEST_GRAIN] = self.legacy_latest
        for grain in self.grains():
            narrowed = backfilled[grain].refold_filter() if grain in backfilled else ""
            source = f"(SELECT * FROM events WHERE {where}{narrowed})"
            cells = " OR ".join(
                f"(metric = {literal(m)} AND slot >= {lo // grain.unit_ms}"
                f" AND slot < {hi // grain.unit_ms})"
                for m, lo, hi in ranges
            )
            delete_rows(self.transport, grain.table, f"account = {account} AND ({cells})")
            self.transport.command(
                f"INSERT INTO {grain.table} {_NO_DEDUPE}"
                f" {fold_select(grain.table, source, keyed_latest=self.keyed_latest)}"
            )
        self._refold_values(account, sorted(days))

    def _refold_values(self, account: str, metrics: Sequence[str]) -> None:
        """Delete the distinct values' rows of the account's ``metrics`` and fold them again
        from every event of theirs: a value's row holds all the hours it was seen in, so the
        rows a day's void touches are not a day's, and a row cannot be cut to the hours
        left. The cost is the (account, metric)'s events, at each void (docs/clickhouse.md,
        "Questions, round 13")."""
        narrowed = self.distinct_values.refold_filter()
        where = f"account = {account} AND metric IN ({literals(metrics)})"
        delete_rows(self.transport, DISTINCT_VALUES, where)
        source = f"(SELECT * FROM events WHERE {where}{narrowed})"
        self.transport.command(
            f"INSERT INTO {DISTINCT_VALUES} {_NO_DEDUPE} {fold_select(DISTINCT_VALUES, source)}"
        )

    # -------------------------------------------------------------- deletion

    def delete_account(self, account_id: str) -> dict[str, int]:
        ids = self.descendants(account_id)
        accounts = literals(ids)
        counts: dict[str, int] = {}
        with self._corrections, self._lock:
            for table in (*self._event_tables(), "keys", "accounts"):
                column = "id" if table == "accounts" else "account"
                where = f"{column} IN ({accounts})"
                found = self.transport.query(f"SELECT count() FROM {table} WHERE {where}")
                counts[table] = int(found[0][0]) if found else 0
                if counts[table]:
                    delete_rows(self.transport, table, where)
        with self.side._limit_write() as run:
            counts.update(delete_account_rows(run, ids))
        return counts

    # -------------------------------------------------------------- retention

    def retain(self, before_ms: int) -> int:
        found = self.transport.query(f"SELECT count() FROM events WHERE ts < {int(before_ms)}")
        dropped = int(found[0][0]) if found else 0
        if dropped:
            with self._lock:
                delete_rows(self.transport, "events", f"ts < {int(before_ms)}")
        with self.side._limit_write() as run:
            set_horizon(run, before_ms)
        self._horizon_read = None
        return dropped

    def compact(self) -> None:
        """Merge away deleted rows (OPTIMIZE ... FINAL), whatever the events table's partitions."""
        for table in self._event_tables():
            self.transport.command(f"OPTIMIZE TABLE {table} FINAL")
