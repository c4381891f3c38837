"""The tables a store's database cannot hold, in a SQLite file beside it: ClickHouse has no
transactions and no unique keys, and "a crossing is recorded once, with its deliveries" or
"a portal token's id is taken once" needs them. The file is small (limits, webhook
endpoints, crossings, deliveries, portal tokens) and off the write path of events."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from usagemeter.model import PortalToken
from usagemeter.store import portalrows
from usagemeter.store.base import Conflict, NotFound
from usagemeter.store.limitstore import LimitTables, Run
from usagemeter.store.schema import PORTAL_TOKENS

SIDE_TABLES = (
    "deliveries",
    "crossings",
    "webhook_endpoints",
    "limits",
    "portal_tokens",
    "alert_log_cursor",
    "voids",  # and the retention horizon: the ClickHouse store's (chvoids.py)
    "raw_horizon",
)


@contextmanager
def sqlite_transaction(conn: sqlite3.Connection, lock: threading.Lock) -> Iterator[Run]:
    """A write transaction on ``conn`` (taken at once: BEGIN IMMEDIATE), under ``lock``; the
    runner it yields executes statements in it."""
    with lock:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield lambda sql, params: conn.execute(sql, params).fetchall()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


class SideFile(LimitTables):
    """Limits, alerts and portal tokens on one SQLite file. Safe to share between threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a recorded crossing survives a crash
        self._conn.execute("PRAGMA busy_timeout=10000")  # other processes on the same file
        self._create_limit_tables()
        # The table of schema.py; its account names an account of the main store (foreign
        # keys are not enforced in this file).
        with self._lock:
            self._conn.executescript(PORTAL_TOKENS)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _limit_read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _limit_write(self) -> AbstractContextManager[Run]:
        return sqlite_transaction(self._conn, self._lock)

    # ------------------------------------------------------------ portal tokens

    def create_portal_token(self, token: PortalToken, secret_hash: bytes) -> PortalToken:
        try:
            with self._limit_write() as run:
                run(portalrows.insert("?"), portalrows.params(token, secret_hash))
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"portal token id {token.id!r} is already taken") from exc
        return token

    def find_portal_tokens_by_lookup(self, lookup: bytes) -> list[tuple[PortalToken, bytes]]:
        rows = self._limit_read(portalrows.select_by_lookup("?"), (lookup,))
        return [portalrows.token_from_row(row) for row in rows]

    def revoke_portal_token(self, token_id: str, now_ms: int) -> PortalToken:
        with self._limit_write() as run:
            rows = run(portalrows.revoke("?"), (now_ms, token_id))
        if not rows:
            raise NotFound(f"portal token {token_id!r} does not exist")
        return portalrows.token_from_row(rows[0])[0]
