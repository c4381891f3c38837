"""Limits, webhook endpoints, crossings and deliveries: their part of the storage protocol,
and one implementation in portable SQL that every store shares through two small hooks
(``_limit_read`` and ``_limit_write``; PostgreSQL's placeholders are rewritten from ``?``).

The tables are small and off the write path: nothing here runs in an event batch's
transaction. A crossing and its deliveries are written in one transaction, so a recorded
crossing always has its deliveries, and the crossing's primary key (limit, period, threshold)
makes "once per limit, period and threshold" the database's rule, across processes too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from usagemeter.limitmodel import (
    Action,
    Crossing,
    Delivery,
    DeliveryStatus,
    Limit,
    Period,
    ThresholdUnit,
    WebhookEndpoint,
)
from usagemeter.store.base import Conflict, NotFound

# Portable DDL: SQLite and PostgreSQL both read it (SQLite gives DOUBLE PRECISION the REAL
# affinity). JSON lists and bodies are TEXT.
LIMIT_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS limits (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    metric TEXT NOT NULL,
    amount DOUBLE PRECISION NOT NULL,
    period TEXT NOT NULL,
    tz TEXT NOT NULL,
    include_subaccounts INTEGER NOT NULL,
    thresholds TEXT NOT NULL,
    threshold_unit TEXT NOT NULL,
    action TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (account, metric)
)""",
    """CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    account TEXT,
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS crossings (
    limit_id TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    id TEXT NOT NULL UNIQUE,
    account TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (limit_id, period_start, threshold)
)""",
    """CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    crossing TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    account TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    last_error TEXT,
    delivered_at BIGINT
)""",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_at)",
    # One row: how far the alerts have read the event log (alerts.py).
    """CREATE TABLE IF NOT EXISTS alert_log_cursor (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    seq BIGINT NOT NULL
)""",
)

Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]

_LIMIT_COLUMNS = (
    "id, account, metric, amount, period, tz, include_subaccounts, thresholds,"
    " threshold_unit, action, created_at"
)
_DELIVERY_COLUMNS = (
    "d.id, d.crossing, d.endpoint, d.account, d.status, d.attempts, d.next_at, d.created_at,"
    " d.last_error, d.delivered_at, c.payload FROM deliveries d"
    " JOIN crossings c ON c.id = d.crossing"
)


def _limit_row(limit: Limit) -> tuple[Any, ...]:
    return (
        limit.id,
        limit.account_id,
        limit.metric,
        limit.amount,
        limit.period.value,
        limit.tz,
        int(limit.include_subaccounts),
        ",".join(repr(t) for t in limit.thresholds),
        limit.threshold_unit.value,
        limit.action.value,
        limit.created_at_ms,
    )


def _limit_from(row: tuple[Any, ...]) -> Limit:
    return Limit(
        id=row[0],
        account_id=row[1],
        metric=row[2],
        amount=float(row[3]),
        period=Period(row[4]),
        tz=row[5],
        include_subaccounts=bool(row[6]),
        thresholds=tuple(float(t) for t in row[7].split(",") if t),
        threshold_unit=ThresholdUnit(row[8]),
        action=Action(row[9]),
        created_at_ms=int(row[10]),
    )


def _delivery_from(row: tuple[Any, ...]) -> Delivery:
    return Delivery(
        id=row[0],
        crossing_id=row[1],
        endpoint_id=row[2],
        account_id=row[3],
        status=DeliveryStatus(row[4]),
        attempts=int(row[5]),
        next_at_ms=int(row[6]),
        created_at_ms=int(row[7]),
        last_error=row[8],
        delivered_at_ms=None if row[9] is None else int(row[9]),
        payload=row[10],
    )


class LimitTables:
    """The LimitStore methods over the two hooks a store provides."""

    def _limit_read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _limit_write(self) -> AbstractContextManager[Run]:
        """A transaction: the runner it yields executes statements in it."""
        raise NotImplementedError

    def _create_limit_tables(self) -> None:
        with self._limit_write() as run:
            for statement in LIMIT_SCHEMA:
                run(statement, ())

    # ------------------------------------------------------------------ limits

    def create_limit(self, limit: Limit) -> Limit:
        with self._limit_write() as run:
            inserted = run(
                f"INSERT INTO limits ({_LIMIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT DO NOTHING RETURNING id",
                _limit_row(limit),
            )
        if not inserted:
            raise Conflict(
                f"account {limit.account_id!r} already has a limit on {limit.metric!r}:"
                " change it with PATCH, or delete it first"
            )
        return limit

    def get_limit(self, account_id: str, metric: str) -> Limit:
        rows = self._limit_read(
            f"SELECT {_LIMIT_COLUMNS} FROM limits WHERE account = ? AND metric = ?",
            (account_id, metric),
        )
        if not rows:
            raise NotFound(f"account {account_id!r} has no limit on {metric!r}")
        return _limit_from(rows[0])

    def list_limits(self, account_id: str | None = None) -> list[Limit]:
        if account_id is None:
            rows = self._limit_read(f"SELECT {_LIMIT_COLUMNS} FROM limits ORDER BY created_at, id")
        else:
            rows = self._limit_read(
                f"SELECT {_LIMIT_COLUMNS} FROM limits WHERE account = ? ORDER BY metric",
                (account_id,),
            )
        return [_limit_from(row) for row in rows]

    def replace_limit(self, limit: Limit) -> Limit:
        row = _limit_row(limit)
        with self._limit_write() as run:
            updated = run(
                "UPDATE limits SET amount = ?, period = ?, tz = ?, include_subaccounts = ?,"
                " thresholds = ?, threshold_unit = ?, action = ? WHERE id = ? RETURNING id",
                (*row[3:10], limit.id),
            )
        if not updated:
            raise NotFound(f"limit {limit.id!r} does not exist")
        return limit

    def delete_limit(self, account_id: str, metric: str) -> None:
        with self._limit_write() as run:
            deleted = run(
                "DELETE FROM limits WHERE account = ? AND metric = ? RETURNING id",
                (account_id, metric),
            )
        if not deleted:
            raise NotFound(f"account {account_id!r} has no limit on {metric!r}")

    # -------------------------------------------------------- the log's cursor

    def alert_cursor(self) -> int | None:
        rows = self._limit_read("SELECT seq FROM alert_log_cursor")
        return int(rows[0][0]) if rows else None

    def advance_alert_cursor(self, seq: int) -> None:
        with self._limit_write() as run:
            run(
                "INSERT INTO alert_log_cursor (one, seq) VALUES (1, ?) ON CONFLICT (one)"
                " DO UPDATE SET seq = excluded.seq WHERE alert_log_cursor.seq < excluded.seq",
                (seq,),
            )

    # ---------------------------------------------------------------- webhooks

    def create_webhook(self, endpoint: WebhookEndpoint) -> WebhookEndpoint:
        with self._limit_write() as run:
            run(
                "INSERT INTO webhook_endpoints (id, url, account, secret, created_at)"
                " VALUES (?,?,?,?,?)",
                (
                    endpoint.id,
                    endpoint.url,
                    endpoint.account_id,
                    endpoint.secret,
                    endpoint.created_at_ms,
                ),
            )
        return endpoint

    def list_webhooks(self) -> list[WebhookEndpoint]:
        rows = self._limit_read(
            "SELECT id, url, account, secret, created_at FROM webhook_endpoints"
            " ORDER BY created_at, id"
        )
        return [WebhookEndpoint(r[0], r[1], r[2], r[3], int(r[4])) for r in rows]

    def delete_webhook(self, endpoint_id: str) -> None:
        with self._limit_write() as run:
            deleted = run("DELETE FROM webhook_endpoints WHERE id = ? RETURNING id", (endpoint_id,))
            # Its pending deliveries go nowhere now: they stop being attempted.
            run(
                "UPDATE deliveries SET status = ?, last_error = ? WHERE endpoint = ?"
                " AND status = ?",
                (
                    DeliveryStatus.FAILED.value,
                    "the endpoint was deleted",
                    endpoint_id,
                    DeliveryStatus.PENDING.value,
                ),
            )
        if not deleted:
            raise NotFound(f"webhook endpoint {endpoint_id!r} does not exist")

    # -------------------------------------------------------------- crossings

    def record_crossing(self, crossing: Crossing, deliveries: Sequence[Delivery]) -> bool:
        with self._limit_write() as run:
            inserted = run(
                "INSERT INTO crossings (limit_id, period_start, threshold, id, account,"
                " payload, created_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
                " RETURNING id",
                (
                    crossing.limit_id,
                    crossing.period_start_ms,
                    crossing.threshold,
                    crossing.id,
                    crossing.account_id,
                    crossing.payload,
                    crossing.created_at_ms,
                ),
            )
            if not inserted:
                return False
            for d in deliveries:
                run(
                    "INSERT INTO deliveries (id, crossing, endpoint, account, status, attempts,"
                    " next_at, created_at) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        d.id,
                        d.crossing_id,
                        d.endpoint_id,
                        d.account_id,
                        d.status.value,
                        d.attempts,
                        d.next_at_ms,
                        d.created_at_ms,
                    ),
                )
        return True

    def due_deliveries(self, now_ms: int, limit: int = 100) -> list[Delivery]:
        rows = self._limit_read(
            f"SELECT {_DELIVERY_COLUMNS} WHERE d.status = ? AND d.next_at <= ?"
            " ORDER BY d.next_at, d.id LIMIT ?",
            (DeliveryStatus.PENDING.value, now_ms, limit),
        )
        return [_delivery_from(row) for row in rows]

    def claim_delivery(self, delivery: Delivery, until_ms: int) -> bool:
        with self._limit_write() as run:
            claimed = run(
                "UPDATE deliveries SET next_at = ? WHERE id = ? AND status = ? AND next_at = ?"
                " RETURNING id",
                (until_ms, delivery.id, DeliveryStatus.PENDING.value, delivery.next_at_ms),
            )
        return bool(claimed)

    def finish_attempt(
        self,
        delivery_id: str,
        status: DeliveryStatus,
        next_at_ms: int,
        error: str | None,
        delivered_at_ms: int | None,
    ) -> None:
        with self._limit_write() as run:
            run(
                "UPDATE deliveries SET status = ?, attempts = attempts + 1, next_at = ?,"
                " last_error = ?, delivered_at = ? WHERE id = ?",
                (status.value, next_at_ms, error, delivered_at_ms, delivery_id),
            )

    def list_deliveries(
        self,
        account_id: str | None = None,
        *,
        status: DeliveryStatus | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[Delivery]:
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if account_id is not None:
            where.append("d.account = ?")
            params.append(account_id)
        if status is not None:
            where.append("d.status = ?")
            params.append(status.value)
        if after is not None:  # keyset paging: after that delivery in (created_at, id) order
            where.append(
                "(d.created_at > (SELECT created_at FROM deliveries WHERE id = ?) OR"
                " (d.created_at = (SELECT created_at FROM deliveries WHERE id = ?)"
                " AND d.id > ?))"
            )
            params.extend([after, after, after])
        sql = f"SELECT {_DELIVERY_COLUMNS} WHERE {' AND '.join(where)} ORDER BY d.created_at, d.id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_delivery_from(row) for row in self._limit_read(sql, params)]

    def get_delivery(self, delivery_id: str) -> Delivery:
        rows = self._limit_read(f"SELECT {_DELIVERY_COLUMNS} WHERE d.id = ?", (delivery_id,))
        if not rows:
            raise NotFound(f"delivery {delivery_id!r} does not exist")
        return _delivery_from(rows[0])

    def replay_delivery(self, delivery_id: str, now_ms: int) -> Delivery:
        with self._limit_write() as run:
            run(
                "UPDATE deliveries SET status = ?, next_at = ? WHERE id = ?",
                (DeliveryStatus.PENDING.value, now_ms, delivery_id),
            )
        rows = self._limit_read(f"SELECT {_DELIVERY_COLUMNS} WHERE d.id = ?", (delivery_id,))
        if not rows:
            raise NotFound(f"delivery {delivery_id!r} does not exist")
        return _delivery_from(rows[0])
