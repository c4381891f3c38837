"""The PostgreSQL store's distinct values per hour (``rollup_values``, schema version 7):
kept by the fold, cleared and gathered again by a correction, and filled from the slots when
a database of version 6 is upgraded, once, however many processes start together."""

from __future__ import annotations

import psycopg

from tests.conftest import empty_postgres, open_at_once
from usagemeter.corrections import VoidSelector
from usagemeter.model import Account, Event
from usagemeter.store.base import TOTAL, AggregateSpec, Measure, Window
from usagemeter.store.pgschema import SCHEMA_VERSION
from usagemeter.store.postgres import PostgresStore

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def _open(url: str) -> PostgresStore:
    return PostgresStore(url, pool_size=2, background_fold=False)


def _sessions(hour: int, sessions: list[str], prefix: str = "e") -> list[Event]:
    """One event per session in the given hour, 10 minutes apart."""
    return [
        Event(
            f"{prefix}{hour}-{n}",
            "a",
            "Sessions",
            BASE_MS + hour * HOUR_MS + n * 600_000,
            dimensions={"session_id": s, "region": "eu"},
        )
        for n, s in enumerate(sessions)
    ]


def _distinct(store: PostgresStore, days: int = 2) -> dict[int, float | None]:
    """Distinct sessions per UTC day (whole hours of the value rollup) and over the range."""
    windows = tuple(
        Window(d, BASE_MS + d * DAY_MS, BASE_MS + (d + 1) * DAY_MS) for d in range(days)
    )
    spec = AggregateSpec(
        ("a",), "Sessions", windows, (Measure("unique_count", "session_id"),), totals=True
    )
    return {r.window: r.values[0] for r in store.aggregate(spec)}


def _values(store: PostgresStore) -> list[tuple[int, str]]:
    with store._pool.connection() as conn:
        rows = conn.execute(
            "SELECT slot, value FROM rollup_values WHERE name = 'session_id' ORDER BY 1, 2"
        ).fetchall()
    return [(int(slot), str(value)) for slot, value in rows]


def test_the_fold_keeps_one_row_per_value_and_hour(postgres_url: str) -> None:
    store = _open(postgres_url)
    try:
        empty_postgres(store)
        store.create_account(Account("a", "A"))
        store.append(_sessions(0, ["s1", "s2", "s1", "s1"]) + _sessions(25, ["s2", "s3"]))
        assert _distinct(store) == {0: 2, 1: 2, TOTAL: 3}  # waiting: read from unfolded
        store.fold(wait=True)
        first = BASE_MS // HOUR_MS
        assert _values(store) == [
            (first, "s1"),
            (first, "s2"),
            (first + 25, "s2"),
            (first + 25, "s3"),
        ]
        assert _distinct(store) == {0: 2, 1: 2, TOTAL: 3}
        # A later fold adds to the hour's set, once per value.
        store.append(_sessions(0, ["s2", "s4"], prefix="f"))
        store.fold(wait=True)
        assert _distinct(store) == {0: 3, 1: 2, TOTAL: 4}
        assert len(_values(store)) == 5
    finally:
        store.close()


def test_a_void_takes_its_value_out_of_the_hour(postgres_url: str) -> None:
    store = _open(postgres_url)
    try:
        empty_postgres(store)
        store.create_account(Account("a", "A"))
        store.append(_sessions(3, ["s1", "s2", "s2"]))
        store.fold(wait=True)
        assert _distinct(store) == {0: 2, TOTAL: 2}
        # The only event of s1: gone from the hour; one of s2's two: s2 stays.
        store.void_events(VoidSelector("a", ids=("e3-0", "e3-1")), "test", None, BASE_MS)
        assert _distinct(store) == {0: 1, TOTAL: 1}
        assert _values(store) == [(BASE_MS // HOUR_MS + 3, "s2")]
    finally:
        store.close()


def _age_to_version_6(store: PostgresStore) -> None:
    with store._pool.connection() as conn:
        conn.execute("DROP TABLE rollup_values")
        conn.execute("DELETE FROM schema_version WHERE version > 6")


def test_a_database_of_version_6_is_upgraded_once_from_its_slots(postgres_url: str) -> None:
    store = _open(postgres_url)
    empty_postgres(store)
    store.create_account(Account("a", "A"))
    store.append(_sessions(1, ["s1", "s2"]) + _sessions(30, ["s2", "s3", "s4"]))
    store.fold(wait=True)
    # Raw events of the first day dropped: only the slots still know its sessions.
    assert store.retain(BASE_MS + DAY_MS) == 2
    store.append(_sessions(31, ["s5"]))  # waiting when the upgrade runs
    _age_to_version_6(store)
    store.close()
    opened = open_at_once(lambda: _open(postgres_url), 3)
    try:
        with psycopg.connect(postgres_url) as conn:
            versions = conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        first = BASE_MS // HOUR_MS
        expected = [(first + 1, "s1"), (first + 1, "s2")]
        expected += [(first + 30, s) for s in ("s2", "s3", "s4")]
        assert _values(opened[0]) == expected
        assert _distinct(opened[1]) == {0: 2, 1: 4, TOTAL: 5}
        opened[2].fold(wait=True)
        assert _distinct(opened[0]) == {0: 2, 1: 4, TOTAL: 5}
        assert _values(opened[0]) == sorted([*expected, (first + 31, "s5")])
    finally:
        for s in opened:
            s.close()
