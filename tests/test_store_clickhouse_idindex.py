"""The ClickHouse store's index of stored ids in chDB mode (chidindex.py): a group of new ids
asks ClickHouse nothing, and every answer and count stays SQLite's, whether the ids are new,
repeated within a batch, across the batches of one group or later groups, sent again after
the index was rebuilt from the table (a reopened session), with conflicting payloads, from
several threads, after an INSERT that failed having stored its events, after an amend, and
past the index's cap."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_store_clickhouse_hours import _transport
from tests.test_store_clickhouse_ingest import (
    _grouped,
    _identity,
    _store_on_tables,
    accounts_and_batches,
)
from usagemeter.corrections import Amendment, VoidSelector
from usagemeter.model import Account, AppendResult, Event
from usagemeter.store import chidindex
from usagemeter.store.chschema import EVENT_IDS_BY_ACCOUNT
from usagemeter.store.chtransport import ChdbTransport
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore

BASE_MS = 1_741_392_000_000  # 2025-03-08T00:00:00Z
_runs = itertools.count()


def _own_database(
    clickhouse_home: str, tmp_path: Path, name: str, statements: tuple[str, ...] = ()
) -> Iterator[ClickHouseStore]:
    """A store on a database of its own (``statements`` made some of its tables first, as
    an older version made them), dropped after."""
    if not clickhouse_home.startswith("chdb:"):
        pytest.skip("the ids' index is chDB's alone: a server keeps the lookups")
    yield from _store_on_tables(clickhouse_home, tmp_path, name, statements)


@pytest.fixture(params=["by_id", "by_account"])
def indexed(
    request: pytest.FixtureRequest, clickhouse_home: str, tmp_path: Path
) -> Iterator[ClickHouseStore]:
    """A store whose ids' index is complete, on either layout of event_ids."""
    older = (EVENT_IDS_BY_ACCOUNT,) if request.param == "by_account" else ()
    yield from _own_database(clickhouse_home, tmp_path, f"idindex_{request.param}", older)


def _reopened(store: ClickHouseStore, tmp_path: Path, clickhouse_home: str) -> ClickHouseStore:
    """Another store on the database, with its index rebuilt from event_ids, as a process
    opening the directory again builds it (the tests' session stays open, so the index the
    session keeps is forgotten first, and ``store`` is not to write again: its index is
    now another's, as an earlier process's is)."""
    assert isinstance(store.transport, ChdbTransport)
    database = store.transport.database
    chidindex._INDEXES[store.transport._shared].pop(database)
    again = ClickHouseStore(
        _transport(clickhouse_home, database), str(tmp_path / f"again-{time.time_ns()}.sqlite")
    )
    assert again.id_index is not None and again.id_index is not store.id_index
    assert again.id_index.wait(60)
    return again


def _lookups(store: ClickHouseStore) -> list[str]:
    """Every statement the store sends that reads event_ids, from now on (recorded as the
    transport runs it)."""
    asked: list[str] = []
    for name in ("query", "query_columns", "command"):
        real: Callable[[str], Any] = getattr(store.transport, name)

        def recorded(sql: str, _real: Callable[[str], Any] = real) -> Any:
            if "event_ids" in sql:
                asked.append(sql)
            return _real(sql)

        setattr(store.transport, name, recorded)
    return asked


def _events(account: str, ids: list[str], value: float = 1.0) -> list[Event]:
    return [Event(id=i, account_id=account, metric="m", ts_ms=BASE_MS, value=value) for i in ids]


def test_a_batch_of_new_ids_asks_clickhouse_nothing(indexed: ClickHouseStore) -> None:
    """Once the index is complete, a batch of new ids is stored without a lookup; a batch
    repeating one stored id asks about that id alone, and is told it is a duplicate."""
    assert indexed.id_index is not None and indexed.id_index.wait(60)
    indexed.create_account(Account("a", "A"))
    asked = _lookups(indexed)
    fresh = [str(uuid.uuid4()) for _ in range(2_000)]
    assert indexed.append(_events("a", fresh)) == AppendResult(2_000, 0)
    assert asked == []
    again = [str(uuid.uuid4()), fresh[7]]
    assert indexed.append(_events("a", again)) == AppendResult(1, 1)
    assert len(asked) == 1 and fresh[7] in asked[0] and again[0] not in asked[0]
    assert indexed.count_events() == 2_001


def test_the_index_is_rebuilt_from_the_table_page_by_page(
    indexed: ClickHouseStore,
    tmp_path: Path,
    clickhouse_home: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reopened, the store reads every stored id back (in pages of 7 here, so an id stored
    under two accounts falls across pages), and a retry of each is a duplicate."""
    monkeypatch.setattr(chidindex, "BUILD_PAGE", 7)
    for account in ("a", "b"):
        indexed.create_account(Account(account, account))
    ids = [f"id-{n:03}" for n in range(40)]
    assert indexed.append(_events("a", ids) + _events("b", ids[::3])).accepted == 54
    again = _reopened(indexed, tmp_path, clickhouse_home)
    try:
        assert again.id_index is not None and len(again.id_index) >= 40
        asked = _lookups(again)
        assert again.append(_events("b", ids)) == AppendResult(26, 14)
        assert again.append(_events("a", ids, value=2.0)) == AppendResult(0, 40, tuple(range(40)))
        assert again.append(_events("a", ["id-new"])) == AppendResult(1, 0)
        assert len(asked) == 2  # the last batch asked nothing
        assert again.count_events() == 81
    finally:
        again.close()


uuids = [str(uuid.UUID(int=n * 0x9E3779B97F4A7C15F39CC0605CEDC835 % 2**128)) for n in range(10)]
sent_event = st.tuples(st.sampled_from(uuids), st.sampled_from(["a", "b"]), st.integers(0, 2))
batch_strategy = st.lists(sent_event, min_size=1, max_size=8)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(batch_strategy, min_size=1, max_size=4),
    later=st.lists(batch_strategy, min_size=1, max_size=3),
)
def test_ids_count_once_with_the_index_as_on_sqlite(
    indexed: ClickHouseStore,
    tmp_path_factory: pytest.TempPathFactory,
    clickhouse_home: str,
    batches: list[list[tuple[str, str, int]]],
    later: list[list[tuple[str, str, int]]],
) -> None:
    """Ids new, repeated within a batch, across the batches of one group, in later groups
    and after the index was rebuilt, some with another payload: every answer and what is
    stored are SQLite's, where the same batches are appended one after the other."""
    path = tmp_path_factory.mktemp("idindex")
    sqlite = SQLiteStore(str(path / "db.sqlite"))
    again: ClickHouseStore | None = None
    try:
        accounts, events = accounts_and_batches((indexed, sqlite), batches + later, next(_runs))
        first, rest = events[: len(batches)], events[len(batches) :]
        outcomes, _ = _grouped(indexed, first)
        assert outcomes == [sqlite.append(batch) for batch in first]
        again = _reopened(indexed, path, clickhouse_home)
        for batch in rest:
            assert again.append(batch) == sqlite.append(batch)
        everything = [e for batch in events for e in batch]
        assert again.append(everything) == sqlite.append(everything)
        listed = sorted(accounts.values())
        assert sorted(again.iter_events(listed), key=_identity) == sorted(
            sqlite.iter_events(listed), key=_identity
        )
    finally:
        if again is not None:
            again.close()
        sqlite.close()


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    senders=st.lists(
        st.lists(st.lists(st.integers(0, 20), min_size=1, max_size=10), min_size=1, max_size=4),
        min_size=2,
        max_size=4,
    )
)
def test_batches_from_threads_count_each_id_once_with_the_index(
    indexed: ClickHouseStore,
    tmp_path_factory: pytest.TempPathFactory,
    senders: list[list[list[int]]],
) -> None:
    """Threads send batches at once from one pool of ids: each id is accepted once in all,
    and what is stored is SQLite's; a second store object on the database shares the index,
    and finds every id stored. (Two store objects have a lock each, as two processes: their
    batches racing each other is the window docs/clickhouse.md states.)"""
    run = next(_runs)
    account = f"t-{run}"
    sqlite = SQLiteStore(str(tmp_path_factory.mktemp("threads") / "db.sqlite"))
    assert isinstance(indexed.transport, ChdbTransport)
    other = ClickHouseStore(
        ChdbTransport(indexed.transport._shared.path, indexed.transport.database),
        str(tmp_path_factory.mktemp("other") / "side.sqlite"),
    )
    try:
        assert other.id_index is indexed.id_index
        for store in (indexed, sqlite):
            store.create_account(Account(account, account))

        def event(n: int) -> Event:  # the payload follows the id: no conflict
            return Event(
                id=f"{uuids[n % 10]}-{n}",
                account_id=account,
                metric="m",
                ts_ms=BASE_MS + n,
                value=float(n),
            )

        start = threading.Barrier(len(senders))
        accepted = [0] * len(senders)

        def send(index: int) -> None:
            start.wait()
            for batch in senders[index]:
                accepted[index] += indexed.append([event(n) for n in batch]).accepted

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(senders))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sent = [event(n) for batches in senders for batch in batches for n in batch]
        assert sum(accepted) == sqlite.append(sent).accepted
        assert sorted(indexed.iter_events([account]), key=_identity) == sorted(
            sqlite.iter_events([account]), key=_identity
        )
        assert other.append(sent) == AppendResult(0, len(sent))
    finally:
        other.close()
        sqlite.close()


def test_ids_of_an_insert_that_failed_after_storing_are_looked_up_on_retry(
    indexed: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An INSERT may fail having stored its events (ClickHouse has no transactions): its ids
    were noted before it ran, so the retry looks them up and finds them stored."""
    indexed.create_account(Account("a", "A"))
    ids = [str(uuid.uuid4()) for _ in range(50)]
    real = indexed.transport.insert_columns

    def stored_then_failed(table: str, *args: Any) -> None:
        real(table, *args)
        raise RuntimeError("the connection dropped after the INSERT")

    monkeypatch.setattr(indexed.transport, "insert_columns", stored_then_failed)
    with pytest.raises(RuntimeError):
        indexed.append(_events("a", ids))
    monkeypatch.setattr(indexed.transport, "insert_columns", real)
    assert indexed.append(_events("a", ids)) == AppendResult(0, 50)
    assert indexed.count_events() == 50


def test_an_amends_replacement_id_is_taken(indexed: ClickHouseStore, tmp_path: Path) -> None:
    """An amend inserts its replacement under a new id: an event sent later with that id is
    a duplicate (or a conflict) there as on SQLite, not a second event."""
    sqlite = SQLiteStore(str(tmp_path / "db.sqlite"))
    try:
        for store in (indexed, sqlite):
            store.create_account(Account("a", "A"))
            assert store.append(_events("a", ["e1", "e2"])).accepted == 2
            store.void_events(
                VoidSelector("a", ids=("e1",)), "fix", None, BASE_MS, Amendment(5.0, "e1-fixed")
            )
        for value in (5.0, 7.0):
            again = _events("a", ["e1-fixed", "e1", "e3"], value=value)
            assert indexed.append(again) == sqlite.append(again)
        assert sorted(indexed.iter_events(), key=_identity) == sorted(
            sqlite.iter_events(), key=_identity
        )
    finally:
        sqlite.close()


def test_past_its_cap_the_index_is_dropped_and_lookups_answer(
    indexed: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_IDS the index is given up (its memory freed) and every group asks ClickHouse
    again, with the same answers."""
    assert indexed.id_index is not None and indexed.id_index.wait(60)
    monkeypatch.setattr(chidindex, "MAX_IDS", 30)
    indexed.create_account(Account("a", "A"))
    ids = [f"c{n}" for n in range(40)]
    assert indexed.append(_events("a", ids[:20])) == AppendResult(20, 0)
    assert indexed.id_index.complete
    assert indexed.append(_events("a", ids[10:])) == AppendResult(20, 10)
    assert indexed.id_index.dropped and not indexed.id_index.complete
    asked = _lookups(indexed)
    assert indexed.append(_events("a", ids)) == AppendResult(0, 40)
    assert len(asked) == 1 and len(indexed.id_index) == 0
