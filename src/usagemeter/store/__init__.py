"""Storage adapters, and the one function that picks one from a URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from usagemeter.store.base import Store

SCHEMES = (
    "sqlite:///path/usage.db",
    "postgresql://user:password@host:5432/db",
    "chdb:///path/dir",
    "clickhouse://user:password@host:8123/db",
)


def open_store(url: str) -> Store:
    """The store a URL names: ``sqlite:///usage.db`` (a relative path; four slashes for an
    absolute one, as SQLAlchemy has it), a bare file path (SQLite too), or
    ``postgresql://user:password@host:5432/db`` (``postgres://`` too; ``?pool_size=N`` sets
    the connections this process keeps, see docs/scaling.md). ValueError says what is wrong."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    path = sqlite_path(url)
    if path is not None:
        import sqlite3

        from usagemeter.store.sqlite import SQLiteStore

        try:
            return SQLiteStore(path)
        except sqlite3.DatabaseError as exc:  # a missing directory, not a SQLite file, ...
            raise ValueError(
                f"cannot open the SQLite file {path!r}: {exc} (does its directory exist, may"
                " this user write there, and is it a usagemeter database?)"
            ) from None
    if scheme in ("postgresql", "postgres"):
        from usagemeter.store.postgres import DEFAULT_POOL_SIZE, PostgresStore

        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        pool = [v for k, v in query if k == "pool_size"]
        if pool and not (pool[-1].isdigit() and int(pool[-1]) >= 1):
            raise ValueError(f"pool_size must be a whole number >= 1, not {pool[-1]!r}")
        rest = urlencode([(k, v) for k, v in query if k != "pool_size"])
        return PostgresStore(
            urlunsplit(parts._replace(query=rest)),
            int(pool[-1]) if pool else DEFAULT_POOL_SIZE,
        )
    if scheme in ("chdb", "clickhouse", "clickhouses"):
        return _open_clickhouse(url, scheme)
    raise ValueError(
        f"unknown store {redact(url)!r}: use a SQLite file path or a URL like "
        + " or ".join(SCHEMES)
    )


def sqlite_path(url: str) -> str | None:
    """The file a SQLite URL (or bare path) names; None when the URL names another store."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("", "sqlite"):
        return None
    path = url.split("://", 1)[1][1:] if scheme else url
    if not path:
        raise ValueError(f"{url!r}: give the SQLite file's path, e.g. sqlite:///usage.db")
    return path


def _open_clickhouse(url: str, scheme: str) -> Store:
    """``chdb:///dir`` (ClickHouse in this process, on the files under dir; a relative path,
    four slashes for an absolute one) or ``clickhouse://user:password@host:8123/db`` (a
    server over HTTP; ``clickhouses://`` for HTTPS). Limits, alerts and portal tokens live
    in a SQLite file: ``side.sqlite`` in chDB's directory, or the one ``?side_db=PATH``
    names (for a server, give every process the same file). ``?fold=later`` creates a new
    database whose rollups are folded after each append is acknowledged rather than inside
    it (chfold.py); an existing database keeps the mode it was created in. See
    docs/clickhouse.md."""
    from usagemeter.store.chtransport import ChdbTransport, HttpTransport, Transport
    from usagemeter.store.clickhouse import ClickHouseStore

    # The query string is cut off by hand: urlunsplit would turn chdb:////abs into chdb://abs.
    url, _, query_string = url.partition("?")
    query = parse_qsl(query_string)
    side_db = [v for k, v in query if k == "side_db"]
    fold = [v for k, v in query if k == "fold"]
    if fold and fold[-1] not in ("later", "views"):
        raise ValueError(f"fold must be 'later' or 'views', not {fold[-1]!r}")
    rest = urlencode([(k, v) for k, v in query if k not in ("side_db", "fold")])
    url = f"{url}?{rest}" if rest else url
    transport: Transport
    if scheme == "chdb":
        path = url.split("://", 1)[1][1:]
        if not path:
            raise ValueError(f"{url!r}: give chDB's directory, e.g. chdb:///usage.chdb")
        try:
            import chdb  # noqa: F401
        except ImportError:
            raise ValueError("chdb:// URLs need chDB: pip install 'usagemeter[chdb]'") from None
        transport = ChdbTransport(path)
        Path(path).mkdir(parents=True, exist_ok=True)
        default_side = str(Path(path) / "side.sqlite")
    else:
        transport = HttpTransport(url)
        default_side = "usagemeter-side.sqlite"
    return ClickHouseStore(
        transport, side_db[-1] if side_db else default_side, fold_later=fold[-1:] == ["later"]
    )


def redact(url: str) -> str:
    """The URL with any password replaced by ***, fit for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
