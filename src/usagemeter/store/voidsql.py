"""Voids, amends, retention and account deletion: their part of the storage protocol.

``VoidLog`` keeps the record of voids and the retention horizon in two small tables of
portable SQL, through the limit tables' hooks (``_limit_read``, ``_limit_write``): on SQLite
and PostgreSQL in the store's own database, on ClickHouse in its side file.

``SqlCorrections`` is the one implementation the SQL stores share. A void runs in one
transaction: it selects the events, deletes them, recomputes every rollup cell of the
affected (account, metric, UTC day)s from the events that survive, and records itself. A day
holds whole hours and slots, so clearing and refolding whole days is exact at every grain,
and costs what the account's events of those days cost. What differs between the stores is
a few hooks: how pending events are folded first (SQLite), how concurrent ingest is held off
(PostgreSQL), where a voided id stays taken, and how a range of events is folded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

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
from usagemeter.store.limitstore import Run
from usagemeter.store.sqlplan import (
    ACCOUNT_DAYS,
    ACCOUNT_HOURS,
    DAY_MS,
    EXPORT_SELECT,
    KEY_DAYS,
    KEY_HOURS,
    SLOTS,
    Dialect,
    event_from_row,
)

VOID_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS voids (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    selector TEXT NOT NULL,
    reason TEXT NOT NULL,
    by_key TEXT,
    at BIGINT NOT NULL,
    count BIGINT NOT NULL,
    replacement TEXT
)""",
    "CREATE INDEX IF NOT EXISTS voids_account ON voids (account, at)",
    # One row: raw events before this instant were dropped by retention (their rollups stay).
    """CREATE TABLE IF NOT EXISTS raw_horizon (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    before_ms BIGINT NOT NULL
)""",
)
_VOID_COLUMNS = "id, account, selector, reason, by_key, at, count, replacement"
# Every rollup table, with the unit its slot column counts; the names are the same on
# every store.
ROLLUP_GRAINS = (SLOTS, KEY_HOURS, KEY_DAYS, ACCOUNT_HOURS, ACCOUNT_DAYS)
# Tables that name accounts by id, wherever the store keeps them: what deleting an
# account removes besides its events, rollups and keys.
ACCOUNT_ID_TABLES = (
    "portal_tokens",
    "deliveries",
    "crossings",
    "limits",
    "webhook_endpoints",
    "voids",
)


def _marks(count: int) -> str:
    return ",".join("?" * count)


def void_row(record: VoidRecord) -> tuple[Any, ...]:
    return (
        record.id,
        record.account_id,
        json.dumps(record.selector.as_dict(), separators=(",", ":"), sort_keys=True),
        record.reason,
        record.by,
        record.at_ms,
        record.count,
        record.replacement,
    )


def void_from_row(row: Sequence[Any]) -> VoidRecord:
    return VoidRecord(
        id=row[0],
        selector=VoidSelector.from_dict(json.loads(row[2])),
        reason=row[3],
        by=row[4],
        at_ms=int(row[5]),
        count=int(row[6]),
        replacement=row[7],
    )


def record_void(run: Run, record: VoidRecord) -> None:
    run(f"INSERT INTO voids ({_VOID_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", void_row(record))


def set_horizon(run: Run, before_ms: int) -> None:
    """Raw events before ``before_ms`` are gone; the horizon only moves forward."""
    run(
        "INSERT INTO raw_horizon (one, before_ms) VALUES (1, ?) ON CONFLICT (one) DO UPDATE"
        " SET before_ms = CASE WHEN excluded.before_ms > raw_horizon.before_ms"
        " THEN excluded.before_ms ELSE raw_horizon.before_ms END",
        (before_ms,),
    )


def delete_counted(run: Run, table: str, where: str, params: Sequence[Any]) -> int:
    """Delete the rows of ``table`` matching ``where``; how many there were (counted first:
    a RETURNING clause would bring every deleted row back to Python)."""
    found = run(f"SELECT count(*) FROM {table} WHERE {where}", params)
    run(f"DELETE FROM {table} WHERE {where}", params)
    return int(found[0][0])


def delete_account_rows(run: Run, account_ids: Sequence[str]) -> dict[str, int]:
    """Delete the rows of ``ACCOUNT_ID_TABLES`` naming the accounts; rows deleted per table."""
    where = f"account IN ({_marks(len(account_ids))})"
    return {table: delete_counted(run, table, where, account_ids) for table in ACCOUNT_ID_TABLES}


class VoidLog:
    """The void records and the retention horizon, over the limit tables' hooks."""

    def _limit_read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _create_void_tables(self) -> None:
        with self._limit_write() as run:  # type: ignore[attr-defined]
            for statement in VOID_SCHEMA:
                run(statement, ())

    def list_voids(self, account_id: str | None = None) -> list[VoidRecord]:
        if account_id is None:
            rows = self._limit_read(f"SELECT {_VOID_COLUMNS} FROM voids ORDER BY at, id")
        else:
            rows = self._limit_read(
                f"SELECT {_VOID_COLUMNS} FROM voids WHERE account = ? ORDER BY at, id",
                (account_id,),
            )
        return [void_from_row(row) for row in rows]

    # Every question asks for the horizon: it is read again at most this often (another
    # process's retention shows within this time; this process's at once).
    _HORIZON_SECONDS = 5.0
    _horizon_read: tuple[float, int | None] | None = None

    def raw_horizon(self) -> int | None:
        """Raw events before this instant (epoch ms) were dropped by retention; None: none."""
        read = self._horizon_read
        now = time.monotonic()
        if read is None or now - read[0] > self._HORIZON_SECONDS:
            rows = self._limit_read("SELECT before_ms FROM raw_horizon")
            read = self._horizon_read = (now, int(rows[0][0]) if rows else None)
        return read[1]


class SqlCorrections(VoidLog):
    """Voids, retention and account deletion in the SQL stores' shared tables."""

    _dialect: Dialect
    # The events with a time in [?, ?), or before ?, as a condition on ``events``: by its
    # own index, or (SQLite) by the table of folded events by time, all folded by then.
    _ts_between = "ts >= ? AND ts < ?"
    _ts_before = "ts < ?"

    # ------------------------------------------------------------------ hooks

    def _begin_correction(self, run: Run, hold_ingest: bool) -> None:
        """First thing in a correction's transaction: make the rollups whole and, if asked,
        hold off ingest until it commits."""

    def _keep_gone(self, run: Run, where: str, params: Sequence[Any], void_id: str | None) -> None:
        """Before events matching ``where`` are deleted: keep their ids taken."""

    def _delete_events(self, run: Run, where: str, params: Sequence[Any]) -> int:
        """Delete the events matching ``where`` (and, in a store that keeps them apart,
        their entries by time); how many there were."""
        return delete_counted(run, "events", where, params)

    def _time_added(self, run: Run, account: int, event_id: str) -> None:
        """A correction stored this event, folded by it: make it found by time."""

    def _gone(self, run: Run, account: int, ids: Sequence[str]) -> set[str]:
        """Those of ``ids`` that were stored once and are no longer raw events."""
        raise NotImplementedError

    def _claim_id(self, run: Run, account: int, event: Event) -> None:
        """Take ``event``'s id for it, or raise Conflict if the id was ever taken."""
        raise NotImplementedError

    def _refold(self, run: Run, account: int, metric: int, start_ms: int, end_ms: int) -> None:
        """Fold the stored events of one account and metric in [start, end) into the (empty)
        rollups of that range."""
        raise NotImplementedError

    def _end_correction(self, run: Run) -> None:
        """Last thing in a void's transaction."""

    def _forget_accounts(self, account_ids: Sequence[str]) -> None:
        """Drop cached row ids of deleted accounts and their keys."""

    def _forget_accounts_in_transaction(self) -> None:
        """The same, as the deletion's last step before its commit, for a store whose
        writers share its lock (other processes learn of it by their caches' expiry)."""

    def _limit_write(self) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ voids

    def void_events(
        self,
        selector: VoidSelector,
        reason: str,
        by: str | None,
        now_ms: int,
        amend: Amendment | None = None,
    ) -> VoidRecord:
        selector.validate()
        void_id = new_void_id()
        with self._limit_write() as run:
            self._begin_correction(run, hold_ingest=True)
            found = run("SELECT rid FROM accounts WHERE id = ?", (selector.account_id,))
            if not found:
                raise NotFound(f"account {selector.account_id!r} does not exist")
            account = int(found[0][0])
            found_horizon = run("SELECT before_ms FROM raw_horizon", ())
            horizon = int(found_horizon[0][0]) if found_horizon else None
            selector.check_horizon(horizon)
            where, params = self._selection(run, selector, account)
            rows = run(f"SELECT event_id, metric, ts FROM events WHERE {where}", params)
            selector.check_found(
                {r[0] for r in rows},
                lambda missing: self._gone(run, account, missing),
                horizon,
                Conflict,
                NotFound,
            )
            replacement = None
            if amend is not None:
                replacement = self._amend(run, account, selector, amend, void_id).id
            self._keep_gone(run, where, params, void_id)
            self._delete_events(run, where, params)
            self._recompute(run, account, days_touched(rows))
            record = VoidRecord(void_id, selector, reason, by, now_ms, len(rows), replacement)
            record_void(run, record)
            self._end_correction(run)
        return record

    def _selection(self, run: Run, selector: VoidSelector, account: int) -> tuple[str, list[Any]]:
        """The WHERE clause over ``events`` that picks the selector's events."""
        where = ["account = ?"]
        params: list[Any] = [account]
        if selector.ids:
            where.append(f"event_id IN ({_marks(len(selector.ids))})")
            params.extend(selector.ids)
            return " AND ".join(where), params
        where.append("metric IN (SELECT id FROM metrics WHERE name = ?)")
        params.append(selector.metric)
        where.append(self._ts_between)
        params.extend([selector.start_ms, selector.end_ms])
        if selector.key_id is not None:
            key = run(
                "SELECT k.rid FROM keys k JOIN accounts a ON a.rid = k.account"
                " WHERE k.id = ? AND a.rid = ?",
                (selector.key_id, account),
            )
            if not key:
                raise NotFound(
                    f"key {selector.key_id!r} does not exist or is not {selector.account_id!r}'s"
                )
            where.append("key = ?")
            params.append(int(key[0][0]))
        json_field = self._dialect.json_field("d.dims")
        for name, value in selector.dimensions:
            where.append(f"dimset IN (SELECT d.id FROM dimsets d WHERE {json_field} = ?)")
            params.extend([self._dialect.json_key(name), value])
        return " AND ".join(where), params

    def _amend(
        self, run: Run, account: int, selector: VoidSelector, amend: Amendment, void_id: str
    ) -> Event:
        """Store the replacement of the one event an amend names, beside it: a copy with
        the new id and value (the void's selection names the old id only)."""
        if len(selector.ids) != 1:
            raise ValueError("ids: an amend names exactly one event")
        row = run(
            f"{EXPORT_SELECT} WHERE e.account = ? AND e.event_id = ?",
            (account, selector.ids[0]),
        )
        old = event_from_row(row[0])
        new = Event(
            id=amend.replacement_id(old.id, void_id),
            account_id=old.account_id,
            metric=old.metric,
            ts_ms=old.ts_ms,
            value=amend.value,
            billable=old.billable,
            key_id=old.key_id,
            dimensions=old.dimensions,
            tags=old.tags,
        )
        self._claim_id(run, account, new)
        run(
            "INSERT INTO events (account, event_id, metric, ts, key, billable, dimset, tagset,"
            " value) SELECT account, ?, metric, ts, key, billable, dimset, tagset, ?"
            " FROM events WHERE account = ? AND event_id = ?",
            (new.id, new.value, account, old.id),
        )
        self._time_added(run, account, new.id)
        return new

    def _recompute(self, run: Run, account: int, days: dict[int, set[int]]) -> None:
        """Clear the rollups of each metric's days and fold them again from the events."""
        for metric, metric_days in sorted(days.items()):
            for first, last in merge_days(metric_days):
                start_ms, end_ms = first * DAY_MS, last * DAY_MS
                for grain in ROLLUP_GRAINS:
                    for table in self._dialect.levels(grain.table):  # every level's cells
                        run(
                            f"DELETE FROM {table} WHERE account = ? AND metric = ?"
                            " AND slot >= ? AND slot < ?",
                            (account, metric, start_ms // grain.unit_ms, end_ms // grain.unit_ms),
                        )
                self._refold(run, account, metric, start_ms, end_ms)

    # -------------------------------------------------------------- deletion

    def delete_account(self, account_id: str) -> dict[str, int]:
        """Remove the account, its subaccounts and everything of theirs, in one transaction:
        rows deleted per table."""
        ids = self.descendants(account_id)  # type: ignore[attr-defined]
        with self._limit_write() as run:
            self._begin_correction(run, hold_ingest=True)
            marks = _marks(len(ids))
            rids = [r[0] for r in run(f"SELECT rid FROM accounts WHERE id IN ({marks})", ids)]
            rid_marks = _marks(len(rids))
            counts = delete_account_rows(run, ids)
            counts["events"] = self._delete_events(run, f"account IN ({rid_marks})", rids)
            # Keys before their accounts, which they reference.
            for table in (
                *self._account_tables(),
                *(t for g in ROLLUP_GRAINS for t in self._dialect.levels(g.table)),
                "keys",
            ):
                counts[table] = delete_counted(run, table, f"account IN ({rid_marks})", rids)
            counts["accounts"] = delete_counted(run, "accounts", f"rid IN ({rid_marks})", rids)
            self._end_correction(run)
            self._forget_accounts_in_transaction()
        self._forget_accounts(ids)
        return counts

    def _account_tables(self) -> tuple[str, ...]:
        """The store's own tables of events' ids, by account row id."""
        return ()

    # -------------------------------------------------------------- retention

    def retain(self, before_ms: int) -> int:
        """Drop the raw events before ``before_ms``, keeping their rollups and their ids
        taken; the number dropped."""
        with self._limit_write() as run:
            # Old events do not change the rollups: ingest goes on meanwhile.
            self._begin_correction(run, hold_ingest=False)
            self._keep_gone(run, self._ts_before, (before_ms,), None)
            dropped = self._delete_events(run, self._ts_before, (before_ms,))
            set_horizon(run, before_ms)
            self._end_correction(run)
        self._horizon_read = None
        return dropped
