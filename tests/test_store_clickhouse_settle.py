"""The ClickHouse store's rollups settle (store/chsettle.py): once quiet, each is merged into
one part per partition. Every database gets the setting, whatever its age; and an answer is
the same read from many parts (each batch a part holding a row of every hour it spans, as a
backfill leaves them) as from the merged table, and equal to SQLite's, in any zone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.questions import answers_to
from usagemeter.engine import Engine
from usagemeter.meters import MeterRegistry
from usagemeter.model import Account, Aggregation, Event, Meter
from usagemeter.store import open_store
from usagemeter.store.chschema import DISTINCT_VALUES
from usagemeter.store.chsettle import (
    SETTLE_AFTER_S,
    SETTLED,
    VALUES_SETTLE_AFTER_S,
    settle_rollups,
    table_settings,
)
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity

BASE = datetime(2025, 11, 1, tzinfo=UTC)  # New York falls back on the 2nd
BASE_MS = int(BASE.timestamp() * 1000)
HOUR_MS = 3_600_000
_AGE = "min_age_to_force_merge_seconds"


def _settings(store: ClickHouseStore) -> dict[str, dict[str, str]]:
    rows = store.transport.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()"
    )
    return {name: table_settings(engine) for name, engine in rows if name in SETTLED}


def _ages(store: ClickHouseStore) -> dict[str, str | None]:
    return {name: table.get(_AGE) for name, table in _settings(store).items()}


def _wanted(values_after_s: int = VALUES_SETTLE_AFTER_S) -> dict[str, str]:
    """Each table's age as this version sets it: the distinct values' own, the others' ten
    minutes."""
    return {t: str(values_after_s if t == DISTINCT_VALUES else SETTLE_AFTER_S) for t in SETTLED}


def test_every_rollup_settles_on_a_database_of_any_age(
    chstore: ClickHouseStore, clickhouse_home: str
) -> None:
    """A database whose rollups lack the setting (made before it), or whose distinct values
    have the others' age (as round 10's version set it), gets this version's ages when a
    store opens it; a table that has an age of its own keeps it."""
    found = _settings(chstore)
    assert set(found) == set(SETTLED)
    assert _ages(chstore) == _wanted()
    assert VALUES_SETTLE_AFTER_S < SETTLE_AFTER_S
    for table in found.values():
        assert table["min_age_to_force_merge_on_partition_only"] == "1"
    for table in SETTLED:
        chstore.transport.command(f"ALTER TABLE {table} RESET SETTING {_AGE}")
    assert all(age is None for age in _ages(chstore).values())
    again = open_store(clickhouse_home)
    assert isinstance(again, ClickHouseStore)
    try:
        assert _ages(again) == _wanted()
    finally:
        again.close()
    # Round 10's version gave the distinct values the others' age: replaced at the next start.
    chstore.transport.command(
        f"ALTER TABLE {DISTINCT_VALUES} MODIFY SETTING {_AGE} = {SETTLE_AFTER_S}"
    )
    settle_rollups(chstore.transport)
    assert _ages(chstore) == _wanted()
    # An age an operator set (0: never; an hour) is kept at the next start.
    chstore.transport.command(f"ALTER TABLE {SETTLED[0]} MODIFY SETTING {_AGE} = 0")
    chstore.transport.command(f"ALTER TABLE {DISTINCT_VALUES} MODIFY SETTING {_AGE} = 3600")
    settle_rollups(chstore.transport)
    assert _ages(chstore) == {**_wanted(), SETTLED[0]: "0", DISTINCT_VALUES: "3600"}
    for table in (SETTLED[0], DISTINCT_VALUES):
        chstore.transport.command(f"ALTER TABLE {table} RESET SETTING {_AGE}")
    settle_rollups(chstore.transport)
    assert _ages(chstore) == _wanted()


def test_the_distinct_values_settle_sooner_only_while_small(chstore: ClickHouseStore) -> None:
    """Above ``values_rows`` rows the distinct values take the others' age (a store written
    in bursts a minute apart would rewrite them after each), and their own again below."""
    chstore.create_account(Account("big", "Big"))
    chstore.append(
        [Event(id=f"b{i}", account_id="big", metric="m", ts_ms=BASE_MS + i) for i in range(3)]
    )
    assert _rows(chstore, DISTINCT_VALUES) > 0  # the row that says where events are
    settle_rollups(chstore.transport, values_rows=0)
    assert _ages(chstore) == _wanted(SETTLE_AFTER_S)
    settle_rollups(chstore.transport, values_rows=_rows(chstore, DISTINCT_VALUES))
    assert _ages(chstore) == _wanted()


@contextmanager
def _merges_stopped(store: ClickHouseStore) -> Iterator[None]:
    for table in SETTLED:
        store.transport.command(f"SYSTEM STOP MERGES {table}")
    try:
        yield
    finally:
        for table in SETTLED:
            store.transport.command(f"SYSTEM START MERGES {table}")


def _rows(store: ClickHouseStore, table: str) -> int:
    rows = store.transport.query(
        "SELECT sum(rows) FROM system.parts WHERE database = currentDatabase()"
        f" AND table = '{table}' AND active"
    )
    return int(rows[0][0])


def _parts(store: ClickHouseStore, table: str) -> int:
    rows = store.transport.query(
        "SELECT count() FROM system.parts WHERE database = currentDatabase()"
        f" AND table = '{table}' AND active"
    )
    return int(rows[0][0])


batches_strategy = st.lists(
    st.lists(
        st.tuples(
            st.integers(-6 * HOUR_MS, 50 * HOUR_MS),  # ms after BASE: across the fall back
            st.integers(0, 20),
            st.sampled_from([None, "x", "y"]),
            st.sampled_from(["s1", "s2", "s3", "s4", None]),
            st.frozensets(st.sampled_from(["t1", "t2"])),
        ),
        min_size=1,
        max_size=15,
    ),
    min_size=2,
    max_size=5,
)
queries = st.fixed_dictionaries(
    {
        "tz": st.sampled_from(["UTC", "America/New_York", "Asia/Kathmandu"]),
        "granularity": st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.TOTAL]),
        "start": st.integers(-8, 30).map(lambda h: h * HOUR_MS),
        "length": st.integers(1, 60).map(lambda h: h * HOUR_MS),
        "aggregation": st.sampled_from(list(Aggregation)),
        "group_by": st.sampled_from([(), ("agent",), ("subaccount",)]),
        "tags": st.sampled_from([frozenset(), frozenset({"t1"})]),
    }
)
_runs = itertools.count()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sent=batches_strategy, asked=st.lists(queries, min_size=1, max_size=4))
def test_answers_from_many_parts_equal_the_settled_tables_and_sqlites(
    sqlite_and_chstore: tuple[SQLiteStore, ClickHouseStore],
    sent: list[list[tuple[Any, ...]]],
    asked: list[dict[str, Any]],
) -> None:
    sqlite, chstore = sqlite_and_chstore
    run = next(_runs)  # each example in accounts of its own: the stores are shared
    a, b = f"sa{run}", f"sb{run}"
    meters = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "s")})
    ids = itertools.count()
    seen: set[int] = set()  # distinct instants: "latest" then has one answer
    written = 0
    with _merges_stopped(chstore):
        for store in (sqlite, chstore):
            store.create_account(Account(a, "A"))
            store.create_account(Account(b, "B", a))
        for batch in sent:
            events = []
            for offset, value, agent, session, tags in batch:
                if offset in seen:
                    continue
                seen.add(offset)
                n = next(ids)
                events.append(
                    Event(
                        id=f"e{n}",
                        account_id=a if n % 3 else b,
                        metric="m",
                        ts_ms=BASE_MS + offset,
                        value=float(value),
                        dimensions={
                            **({"agent": agent} if agent else {}),
                            **({"s": session} if session else {}),
                        },
                        tags=tags,
                    )
                )
            written += bool(events)
            for store in (sqlite, chstore):
                store.append(events)
        expected = answers_to(Engine(sqlite, meters), (a, b), BASE, asked)
        assert answers_to(Engine(chstore, meters), (a, b), BASE, asked) == expected
        assert _parts(chstore, "distinct_values") >= written  # a part per batch
    for table in SETTLED:
        chstore.transport.command(f"OPTIMIZE TABLE {table} FINAL")
        assert _parts(chstore, table) <= 1
    assert answers_to(Engine(chstore, meters), (a, b), BASE, asked) == expected
