"""Limits and alerts in a SQLite file of their own, for a store whose database cannot hold
them: ClickHouse has no transactions and no unique keys, and "a crossing is recorded once,
with its deliveries" needs both. The file is small (limits, endpoints, crossings, deliveries)
and off the write path of events."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from usagemeter.store.limitstore import LimitTables, Run

LIMIT_TABLES = ("deliveries", "crossings", "webhook_endpoints", "limits")


class LimitFile(LimitTables):
    """The LimitStore methods on one SQLite file. Safe to share between threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a recorded crossing survives a crash
        self._conn.execute("PRAGMA busy_timeout=10000")  # other processes on the same file
        self._create_limit_tables()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _limit_read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    @contextmanager
    def _limit_write(self) -> Iterator[Run]:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield lambda sql, params: conn.execute(sql, params).fetchall()
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
