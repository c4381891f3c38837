"""The ClickHouse store's dedupe lookup on ids as providers send them (random UUIDs): a
database made since round 16 orders event_ids by the id first, so a batch's lookup reads
about one granule per id asked, however many are stored; one made before keeps (account,
id). In both layouts a retried batch, an id resent within a batch, across batches of one
group or across groups, and across two store objects on one database counts once, and an
id sent again with another payload is a conflict, as on SQLite."""

from __future__ import annotations

import itertools
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

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
from usagemeter.model import Account, AppendResult, Event
from usagemeter.store.chschema import EVENT_IDS_BY_ACCOUNT, ids_by_id
from usagemeter.store.clickhouse import ClickHouseStore, stored_digests_sql
from usagemeter.store.sqlite import SQLiteStore

BASE_MS = 1_741_392_000_000  # 2025-03-08T00:00:00Z
_runs = itertools.count()


@pytest.fixture
def by_account(clickhouse_home: str, tmp_path: Path) -> Iterator[ClickHouseStore]:
    """A store on a database whose event_ids an older version made, keyed (account, id)."""
    yield from _store_on_tables(
        clickhouse_home, tmp_path, "ids_by_account", (EVENT_IDS_BY_ACCOUNT,)
    )


@pytest.fixture(params=["by_id", "by_account"])
def layout(request: pytest.FixtureRequest) -> ClickHouseStore:
    """A store on either layout of event_ids: a new database's, or one made before."""
    store: ClickHouseStore = request.getfixturevalue(
        "chstore" if request.param == "by_id" else "by_account"
    )
    assert ids_by_id(store.transport) is (request.param == "by_id")
    return store


def _second(store: ClickHouseStore, tmp_path: Path, clickhouse_home: str) -> ClickHouseStore:
    """Another store object on the same database (another process, with its own lock)."""
    database = store.transport.query("SELECT currentDatabase()")[0][0]
    return ClickHouseStore(_transport(clickhouse_home, database), str(tmp_path / "second.sqlite"))


def test_a_database_keeps_the_layout_of_its_event_ids(
    by_account: ClickHouseStore, chstore: ClickHouseStore, tmp_path: Path, clickhouse_home: str
) -> None:
    """A new database orders event_ids by the id; one made before keeps (account, id), also
    once a store of this version has opened it, and another opens it again."""
    assert ids_by_id(chstore.transport) is True
    assert ids_by_id(by_account.transport) is False
    again = _second(by_account, tmp_path, clickhouse_home)
    try:
        assert ids_by_id(again.transport) is False
    finally:
        again.close()


def _granules(store: ClickHouseStore, sql: str) -> tuple[int, int]:
    """The granules the primary key keeps for ``sql``, and the table's."""
    plan = " ".join(str(row[0]) for row in store.transport.query(f"EXPLAIN indexes = 1 {sql}"))
    kept, total = re.findall(r"Granules: (\d+)/(\d+)", plan)[-1]
    return int(kept), int(total)


def test_a_batch_of_random_ids_reads_about_a_granule_per_id_asked(
    layout: ClickHouseStore,
) -> None:
    """20,000 random ids stored: a lookup of 10 new random ids and of 10 stored ones keeps
    a granule or two per id (two where it falls on a granule's edge) and part in a new
    database, where (account, id) keeps every
    granule (the accounts' ids match any of the ids asked)."""
    accounts = [f"acct-{n}" for n in range(20)]
    for account in accounts:
        layout.create_account(Account(account, account))
    stored = [str(uuid.uuid4()) for _ in range(20_000)]
    for first in range(0, len(stored), 10_000):
        batch = [
            Event(id=i, account_id=accounts[n % 20], metric="m", ts_ms=BASE_MS + n)
            for n, i in enumerate(stored[first : first + 10_000], start=first)
        ]
        assert layout.append(batch) == AppendResult(10_000, 0)
    parts = int(
        layout.transport.query(
            "SELECT count() FROM system.parts WHERE database = currentDatabase()"
            " AND table = 'event_ids' AND active"
        )[0][0]
    )
    for asked in ([str(uuid.uuid4()) for _ in range(10)], stored[5_000:20_000:1_500]):
        kept, total = _granules(layout, stored_digests_sql(accounts, asked))
        if ids_by_id(layout.transport):
            assert total >= 150 and kept <= 2 * len(asked) * parts  # two: at a boundary
        else:
            assert kept == total
    assert layout.count_events() == 20_000


uuids = [str(uuid.UUID(int=n * 0x9E3779B97F4A7C15F39CC0605CEDC835 % 2**128)) for n in range(12)]
sent_event = st.tuples(st.sampled_from(uuids), st.sampled_from(["a", "b"]), st.integers(0, 2))
batch_strategy = st.lists(sent_event, min_size=1, max_size=8)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(batch_strategy, min_size=1, max_size=4), resend=st.integers(0, 3))
def test_random_ids_count_once_in_either_layout_as_on_sqlite(
    layout: ClickHouseStore,
    tmp_path_factory: pytest.TempPathFactory,
    clickhouse_home: str,
    batches: list[list[tuple[str, str, int]]],
    resend: int,
) -> None:
    """Random ids resent within a batch, across the batches of one group, in a later group
    and through a second store object on the same database: each batch's answer (new,
    repeated, conflicting by index: the same id with another value) and what is stored are
    SQLite's, where the same batches are appended one after the other."""
    path = tmp_path_factory.mktemp("dedupe")
    sqlite = SQLiteStore(str(path / "db.sqlite"))
    other = _second(layout, path, clickhouse_home)
    try:
        accounts, events = accounts_and_batches((layout, sqlite), batches, next(_runs))
        outcomes, _ = _grouped(layout, events)
        assert outcomes == [sqlite.append(batch) for batch in events]
        # A batch resent: to this store (a later group), then to the other store object.
        again = events[resend % len(events)]
        assert layout.append(again) == sqlite.append(again)
        assert other.append(again) == sqlite.append(again)
        assert other.append([e for batch in events for e in batch]) == sqlite.append(
            [e for batch in events for e in batch]
        )
        listed = sorted(accounts.values())
        assert sorted(layout.iter_events(listed), key=_identity) == sorted(
            sqlite.iter_events(listed), key=_identity
        )
    finally:
        other.close()
        sqlite.close()


# Batches from several threads at once: groups overlap, and a batch waits in the queue while
# a group repeating its ids INSERTs.

pooled_event = st.tuples(st.integers(0, 15), st.sampled_from(["a", "b"]))
sender = st.lists(st.lists(pooled_event, min_size=1, max_size=12), min_size=1, max_size=4)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(senders=st.lists(sender, min_size=2, max_size=4))
def test_batches_from_threads_at_once_count_each_id_once_as_on_sqlite(
    chstore: ClickHouseStore,
    tmp_path_factory: pytest.TempPathFactory,
    senders: list[list[list[tuple[int, str]]]],
) -> None:
    """Threads send batches at once, each drawing its ids from one small pool, so that a
    batch's lookup runs while a group repeating its ids INSERTs: each id is accepted once in
    all (a payload per id, so whichever thread is first), what is stored and every total
    are SQLite's, and a batch sent again is all duplicates."""
    run = next(_runs)
    accounts = {name: f"{name}-t{run}" for name in ("a", "b")}
    sqlite = SQLiteStore(str(tmp_path_factory.mktemp("threads") / "db.sqlite"))
    try:
        for store in (chstore, sqlite):
            for account in accounts.values():
                store.create_account(Account(account, account))

        def event(n: int, a: str) -> Event:
            # The payload follows the id: no conflict, whichever copy is stored.
            return Event(
                id=uuids[n % len(uuids)] + str(n),
                account_id=accounts[a],
                metric="m",
                ts_ms=BASE_MS + n * 60_000,
                value=float(n),
            )

        sent = [[[event(n, a) for n, a in batch] for batch in batches] for batches in senders]
        results: list[list[AppendResult]] = [[] for _ in sent]
        start = threading.Barrier(len(sent))

        def send(index: int) -> None:
            start.wait()
            results[index] = [chstore.append(batch) for batch in sent[index]]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(sent))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        every = [batch for batches in sent for batch in batches]
        on_sqlite = [sqlite.append(batch) for batch in every]
        answers = [r for rs in results for r in rs]
        assert len(answers) == len(every)
        assert all(not r.conflicts for r in answers)
        assert sum(r.accepted for r in answers) == sum(r.accepted for r in on_sqlite)
        assert sum(r.duplicates for r in answers) == sum(r.duplicates for r in on_sqlite)
        listed = sorted(accounts.values())
        assert sorted(chstore.iter_events(listed), key=_identity) == sorted(
            sqlite.iter_events(listed), key=_identity
        )
        again = every[-1]
        assert chstore.append(again) == AppendResult(0, len(again)) == sqlite.append(again)
    finally:
        sqlite.close()
