"""How the ClickHouse store talks to ClickHouse: one small interface, two transports that run
the same SQL text. ``chdb:///dir`` runs the engine in this process (the tests use it, and so
may a single big machine); ``clickhouse://user:password@host:8123/db`` speaks HTTP to a
server or cluster through ``clickhouse-connect``.

Values reach the SQL as literals made by ``literal``: the ClickHouse store builds every
statement itself, and both transports then send plain text, so what the tests run on chDB is
exactly what a server gets.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import msgspec

from usagemeter.store import redact

# Output settings for every query: numbers as JSON numbers, not quoted strings.
_JSON_SETTINGS = "output_format_json_quote_64bit_integers = 0"
# Statements carry their values as literals: a batch's dedupe lookup or a year of hourly
# windows is longer than the default 256 KiB limit. Set per session, before parsing.
MAX_QUERY_SIZE = 64 * 1024 * 1024
# A batch may span many months (a backfill): each is a partition of its own, and the
# default limit of 100 per insert would refuse the batch.
# The materialized views of an insert run side by side rather than one after the other, and
# a deduplicated insert is deduplicated in the tables they feed as well.
# No merge of an insert's own rows before its part is written (optimize_on_insert): every
# view's SELECT already groups its block by its table's key, and the store never inserts
# two rows of one (account, id), so that pass found nothing to fold and cost an append of
# 10,000 events 1.1 to 1.3 times its time (docs/clickhouse.md, round 6). Answers never
# depend on it: every question folds the rows it reads.
INSERT_SETTINGS = {
    "max_partitions_per_insert_block": 0,
    "parallel_view_processing": 1,
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    "optimize_on_insert": 0,
}


def _insert_settings(token: str | None) -> dict[str, Any]:
    return (
        INSERT_SETTINGS
        if token is None
        else {**INSERT_SETTINGS, "insert_deduplication_token": token}
    )


def literal(value: Any) -> str:
    """A ClickHouse literal for a Python value (str, int, float, bool, None, or a list or
    tuple of those)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "tuple(" + ", ".join(literal(v) for v in value) + ")"
    raise TypeError(f"no ClickHouse literal for {type(value).__name__}")


def literals(values: Sequence[Any]) -> str:
    """A comma-separated list of literals, for ``IN (...)``."""
    return ", ".join(literal(v) for v in values)


def _columns(raw: bytes) -> list[list[Any]]:
    """JSONCompactColumns: a JSON array of the columns' arrays (empty when no row)."""
    columns: list[list[Any]] = msgspec.json.decode(raw) if raw.strip() else []
    return columns


class Transport(Protocol):
    """What the ClickHouse store needs of a connection."""

    def command(self, sql: str) -> None:
        """Run a statement that returns nothing (DDL, ALTER, TRUNCATE)."""
        ...

    def query_columns(self, sql: str) -> list[list[Any]]:
        """A SELECT's result by columns: one list per selected column (none when no row).
        A report of thousands of rows decodes in a few lists, not a list per row."""
        ...

    def query(self, sql: str) -> list[list[Any]]:
        """Rows of a SELECT, as lists of JSON-like values (Map as dict, Array as list)."""
        ...

    def insert_columns(
        self, table: str, data: Mapping[str, Sequence[Any]], token: str | None = None
    ) -> None:
        """Insert ``data`` (each column's values, all of one length) in one block: the
        materialized views see it as one insert. A second insert with the same ``token`` is
        dropped (where the table keeps tokens)."""
        ...

    def close(self) -> None: ...


def insert_rows(
    transport: Transport,
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    token: str | None = None,
) -> None:
    """Insert ``rows`` (tuples in ``columns`` order) in one block, as columns."""
    if rows:
        transport.insert_columns(
            table, dict(zip(columns, zip(*rows, strict=True), strict=True)), token
        )


def _json_columns(data: Mapping[str, Sequence[Any]]) -> bytes:
    """JSONColumns: one JSON object of each column's values. A batch is one msgspec call
    (a call per row took 9 ms per 10,000 events), and the store builds its columns with a
    comprehension each, never a tuple per event."""
    return msgspec.json.encode(data)


def _rows_in(data: Mapping[str, Sequence[Any]]) -> int:
    return len(next(iter(data.values()), ()))


class _ChdbSession:
    """chDB allows one session per process; every store on the same directory shares it."""

    def __init__(self, path: str) -> None:
        from chdb import session

        self.path = path
        created: Any = session.Session(path)  # type: ignore[no-untyped-call]
        created.query(f"SET max_query_size = {MAX_QUERY_SIZE}")
        self.session = created
        self.users = 0
        self.database = ""  # the session's current database
        # chDB's session is not safe to use from several threads at once.
        self.lock = threading.Lock()


_SESSIONS: dict[str, _ChdbSession] = {}
_SESSIONS_LOCK = threading.Lock()


class ChdbTransport:
    """ClickHouse in this process, on the files under ``path``."""

    def __init__(self, path: str, database: str = "usagemeter") -> None:
        with _SESSIONS_LOCK:
            shared = _SESSIONS.get(path)
            if shared is None:
                if _SESSIONS:
                    open_path = next(iter(_SESSIONS))
                    raise ValueError(
                        f"chDB keeps one directory per process, and {open_path!r} is open:"
                        f" close its store before opening {path!r}"
                    )
                shared = _SESSIONS[path] = _ChdbSession(path)
            shared.users += 1
        self._shared = shared
        self.database = database
        with shared.lock:
            shared.session.query(f"CREATE DATABASE IF NOT EXISTS {database}")

    def _run(self, sql: str, fmt: str = "CSV") -> Any:
        with self._shared.lock:
            self._use()
            return self._shared.session.query(sql, fmt)

    def _use(self) -> None:
        """Switch the shared session to this store's database (another store in this process
        may have switched it); the caller holds the session's lock."""
        if self._shared.database != self.database:
            self._shared.session.query(f"USE {self.database}")
            self._shared.database = self.database

    def command(self, sql: str) -> None:
        self._run(sql)

    def query_columns(self, sql: str) -> list[list[Any]]:
        raw = self._run(f"{sql} SETTINGS {_JSON_SETTINGS}", "JSONCompactColumns").bytes()
        return _columns(raw)

    def query(self, sql: str) -> list[list[Any]]:
        result = self._run(f"{sql} SETTINGS {_JSON_SETTINGS}", "JSONCompact")
        raw = result.bytes()
        if not raw:
            return []
        data: list[list[Any]] = msgspec.json.decode(raw)["data"]
        return data

    def insert_columns(
        self, table: str, data: Mapping[str, Sequence[Any]], token: str | None = None
    ) -> None:
        if not _rows_in(data):
            return
        settings = ", ".join(f"{k} = {literal(v)}" for k, v in _insert_settings(token).items())
        block = _json_columns(data)
        # Streamed beside the statement rather than inside it: ClickHouse's SQL parser then
        # never reads the rows (half the cost of parsing a batch of 10,000 events).
        with self._shared.lock:
            self._use()
            inserter = self._shared.session.send_insert(
                f"INSERT INTO {table} ({', '.join(data)}) SETTINGS {settings}", "JSONColumns"
            )
            with inserter:
                inserter.append(block)
                inserter.finish()

    def close(self) -> None:
        with _SESSIONS_LOCK:
            self._shared.users -= 1
            if self._shared.users == 0:
                self._shared.session.close()
                del _SESSIONS[self._shared.path]


class HttpTransport:
    """A ClickHouse server over HTTP, through clickhouse-connect."""

    def __init__(self, url: str) -> None:
        try:
            import clickhouse_connect
        except ImportError:
            raise ValueError(
                "clickhouse:// URLs need clickhouse-connect: pip install 'usagemeter[clickhouse]'"
            ) from None
        parts = urlsplit(url)
        self.database = parts.path.strip("/") or "usagemeter"
        common: dict[str, Any] = {
            "host": parts.hostname or "localhost",
            "port": parts.port or 8123,
            "username": unquote(parts.username or "default"),
            "password": unquote(parts.password or ""),
            "secure": url.startswith("clickhouses://"),
            "settings": {"max_query_size": MAX_QUERY_SIZE},
        }
        try:
            admin = clickhouse_connect.get_client(**common)
            admin.command(f"CREATE DATABASE IF NOT EXISTS {self.database}")
            admin.close()
            self._client: Any = clickhouse_connect.get_client(**common, database=self.database)
        except Exception as exc:  # its errors vary by cause; all mean "cannot use this URL"
            reason = str(exc)
            if common["password"]:
                reason = reason.replace(common["password"], "***")
            raise ConnectionError(f"cannot connect to {redact(url)}: {reason}") from None
        # clickhouse-connect's client keeps one HTTP session; requests are serialised on it.
        self._lock = threading.Lock()

    def command(self, sql: str) -> None:
        with self._lock:
            self._client.command(sql)

    def query_columns(self, sql: str) -> list[list[Any]]:
        with self._lock:
            raw = self._client.raw_query(
                f"{sql} SETTINGS {_JSON_SETTINGS}", fmt="JSONCompactColumns"
            )
        return _columns(raw)

    def query(self, sql: str) -> list[list[Any]]:
        with self._lock:
            raw = self._client.raw_query(f"{sql} SETTINGS {_JSON_SETTINGS}", fmt="JSONCompact")
        data: list[list[Any]] = msgspec.json.decode(raw)["data"] if raw else []
        return data

    def insert_columns(
        self, table: str, data: Mapping[str, Sequence[Any]], token: str | None = None
    ) -> None:
        if not _rows_in(data):
            return
        with self._lock:
            self._client.raw_insert(
                table,
                list(data),
                insert_block=_json_columns(data),
                settings=_insert_settings(token),
                fmt="JSONColumns",
            )

    def close(self) -> None:
        self._client.close()
