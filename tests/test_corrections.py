"""Voids and amends on every store: reports reflect them at once and exactly, the ids stay
taken, and any sequence of appends and voids reports what a store of the survivors would."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import STORES, open_test_store
from usagemeter.corrections import Amendment, VoidSelector
from usagemeter.model import Account, AppendResult, Event
from usagemeter.store import open_store, rows
from usagemeter.store.base import (
    AggregateRow,
    AggregateSpec,
    Conflict,
    Measure,
    NotFound,
    Store,
    Window,
)
from usagemeter.store.postgres import PostgresStore
from usagemeter.store.sqlite import SQLiteStore

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
MIN_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
NOW_MS = BASE_MS + 30 * DAY_MS
MEASURES = (
    Measure("count"),
    Measure("sum"),
    Measure("min"),
    Measure("max"),
    Measure("latest"),
    Measure("unique_count", "s"),
)


def _event(i: int | str, ts: int, value: float = 1.0, account: str = "a", **dims: str) -> Event:
    return Event(f"e{i}", account, "m", ts, float(value), dimensions=dims)


def _report(
    store: Store, account: str, windows: tuple[Window, ...], group_by: tuple[str, ...] = ()
) -> list[AggregateRow]:
    rows = store.aggregate(AggregateSpec((account,), "m", windows, MEASURES, group_by))
    return sorted(rows, key=lambda r: (r.window, repr(r.group)))


def _day(store: Store, account: str = "a") -> tuple[float | None, ...]:
    rows = _report(store, account, (Window(0, BASE_MS, BASE_MS + DAY_MS),))
    return rows[0].values if rows else ()


@pytest.fixture
def accounts(store: Store) -> Store:
    store.create_account(Account("a", "A"))
    store.create_account(Account("b", "B"))
    return store


def test_a_void_by_id_is_reflected_exactly_and_the_id_stays_taken(accounts: Store) -> None:
    store = accounts
    events = [
        _event(1, BASE_MS + 1 * MIN_MS, 5, s="x"),
        _event(2, BASE_MS + 2 * MIN_MS, 9, s="y"),  # the maximum
        _event(3, BASE_MS + 3 * MIN_MS, 2, s="x"),  # the latest and the minimum
        _event(4, BASE_MS + 5 * HOUR_MS, 4, account="b"),
    ]
    store.append(events)
    assert _day(store) == (3, 16, 2, 9, 2, 2)
    record = store.void_events(VoidSelector("a", ids=("e2", "e3")), "test data", "k1", NOW_MS)
    assert record.count == 2 and record.by == "k1" and record.reason == "test data"
    # Count, sum, min, max, latest and the distinct count: all from the survivor alone.
    assert _day(store) == (1, 5, 5, 5, 5, 1)
    assert _day(store, "b") == (1, 4, 4, 4, 4, 0)  # another account's day is untouched
    # A retry of a voided event is a duplicate, not a new event.
    assert store.append([events[1]]) == AppendResult(0, 1)
    assert _day(store) == (1, 5, 5, 5, 5, 1)
    assert [v.id for v in store.list_voids("a")] == [record.id]
    assert store.list_voids("b") == []
    assert store.list_voids()[0].selector == VoidSelector("a", ids=("e2", "e3"))
    assert [e.id for e in store.iter_events(["a"])] == ["e1"]


def test_a_void_by_filter_takes_a_metric_range_and_dimensions(accounts: Store) -> None:
    store = accounts
    store.append(
        [
            _event(1, BASE_MS + 10 * MIN_MS, 1, agent="bot"),
            _event(2, BASE_MS + 20 * MIN_MS, 2, agent="human"),
            _event(3, BASE_MS + 2 * DAY_MS, 3, agent="bot"),  # outside the range
            Event("e4", "a", "other", BASE_MS + 10 * MIN_MS, 4.0, dimensions={"agent": "bot"}),
        ]
    )
    selector = VoidSelector(
        "a", metric="m", start_ms=BASE_MS, end_ms=BASE_MS + DAY_MS, dimensions=(("agent", "bot"),)
    )
    assert store.void_events(selector, "bot traffic", None, NOW_MS).count == 1
    assert sorted(e.id for e in store.iter_events(["a"])) == ["e2", "e3", "e4"]
    assert _day(store)[:2] == (1, 2)
    # The hour and the grouped slots agree with the day.
    rows = _report(store, "a", (Window(0, BASE_MS, BASE_MS + HOUR_MS),), ("agent",))
    assert [(r.group, r.values[:2]) for r in rows] == [((("agent", "human"),), (1, 2))]


def test_voids_report_what_they_cannot_do(accounts: Store) -> None:
    store = accounts
    store.append([_event(1, BASE_MS), _event(2, BASE_MS, account="b")])
    with pytest.raises(NotFound, match="e9"):
        store.void_events(VoidSelector("a", ids=("e1", "e9")), "r", None, NOW_MS)
    with pytest.raises(NotFound, match="e2"):  # another account's event is not this one's
        store.void_events(VoidSelector("a", ids=("e2",)), "r", None, NOW_MS)
    with pytest.raises(NotFound, match="nobody"):
        store.void_events(VoidSelector("nobody", ids=("e1",)), "r", None, NOW_MS)
    with pytest.raises(ValueError, match="metric: required"):
        store.void_events(VoidSelector("a"), "r", None, NOW_MS)
    assert store.count_events() == 2  # nothing of a refused void happened
    store.void_events(VoidSelector("a", ids=("e1",)), "r", None, NOW_MS)
    with pytest.raises(Conflict, match="no longer stored"):
        store.void_events(VoidSelector("a", ids=("e1",)), "again", None, NOW_MS)
    assert len(store.list_voids()) == 1


def test_an_amend_replaces_one_event_under_a_new_id(accounts: Store) -> None:
    store = accounts
    original = _event(1, BASE_MS + MIN_MS, 10, s="x")
    store.append([original, _event(2, BASE_MS, 3, s="y")])
    record = store.void_events(
        VoidSelector("a", ids=("e1",)), "wrong value", "k1", NOW_MS, Amendment(4.0)
    )
    assert record.count == 1 and record.replacement == f"e1~{record.id}"
    # The replacement keeps the original's time, so it is still the latest value.
    assert _day(store) == (2, 7, 3, 4, 4, 2)
    stored = {e.id: e for e in store.iter_events(["a"])}
    assert stored[f"e1~{record.id}"].value == 4.0 and "e1" not in stored
    assert store.append([original]) == AppendResult(0, 1)  # the old id is still taken
    # A chosen id; one already taken is refused, and nothing happens.
    with pytest.raises(Conflict, match="e2"):
        store.void_events(
            VoidSelector("a", ids=(f"e1~{record.id}",)), "r", None, NOW_MS, Amendment(5.0, "e2")
        )
    again = store.void_events(
        VoidSelector("a", ids=(f"e1~{record.id}",)), "r", None, NOW_MS, Amendment(6.0, "e1b")
    )
    assert again.replacement == "e1b" and _day(store)[:2] == (2, 9)


def test_voids_and_an_amend_racing_concurrent_ingest_count_every_survivor_once(
    accounts: Store,
) -> None:
    store = accounts
    store.append([_event(f"old{i}", BASE_MS + i * MIN_MS, 100) for i in range(50)])
    stop = threading.Event()
    sent: list[int] = []

    def ingest() -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            store.append([_event(f"new{n}", BASE_MS + (50 + n % 60) * MIN_MS, 1)])
            sent.append(n)

    writer = threading.Thread(target=ingest)
    writer.start()
    try:
        for i in range(0, 40, 10):
            ids = tuple(f"eold{j}" for j in range(i, i + 10))
            store.void_events(VoidSelector("a", ids=ids), "racing", None, NOW_MS)
        amend = VoidSelector("a", ids=("eold49",))
        store.void_events(amend, "racing", None, NOW_MS, Amendment(1.0, "eamended"))
        rest = VoidSelector(
            "a", metric="m", start_ms=BASE_MS + 40 * MIN_MS, end_ms=BASE_MS + 49 * MIN_MS
        )
        store.void_events(rest, "racing", None, NOW_MS)
    finally:
        stop.set()
        writer.join()
    # The new events remain, and the amended one at its new value: each counted once, at
    # every grain.
    survivors = len(sent) + 1
    assert _day(store) == (survivors, survivors, 1, 1, 1, 0)
    hours = tuple(Window(h, BASE_MS + h * HOUR_MS, BASE_MS + (h + 1) * HOUR_MS) for h in range(2))
    assert sum(r.values[0] or 0 for r in _report(store, "a", hours)) == survivors


# ------------------------------------------------------------ property test

_op = st.one_of(
    st.tuples(
        st.just("append"),
        st.lists(
            st.tuples(
                st.integers(0, 11),  # id: repeats are retries
                st.integers(0, 3 * DAY_MS // MIN_MS),  # minute of three days
                st.integers(-5, 20),  # value
                st.sampled_from(["x", "y", "z"]),  # dimension s
            ),
            min_size=1,
            max_size=6,
        ),
    ),
    st.tuples(st.just("void_ids"), st.lists(st.integers(0, 11), min_size=1, max_size=3)),
    st.tuples(st.just("amend"), st.tuples(st.integers(0, 11), st.integers(-5, 20))),
    st.tuples(
        st.just("void_range"),
        st.tuples(st.integers(0, 3 * 24 * 4), st.integers(1, 40), st.sampled_from([None, "x"])),
    ),
)


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(_op, min_size=1, max_size=8))
def test_appends_and_voids_report_as_a_store_of_the_survivors(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    store_kind: str,
    ops: list[tuple[str, object]],
) -> None:
    """Any sequence of appends, voids and amends gives the reports a fresh store holding only
    the surviving events gives, at every grain and for every aggregation."""
    store = open_test_store(store_kind, request, tmp_path_factory.mktemp("void") / "v.db")
    try:
        _check_survivors(store, ops)
    finally:
        store.close()


def _check_survivors(store: Store, ops: list[tuple[str, object]]) -> None:
    store.create_account(Account("live", "Live"))
    store.create_account(Account("fresh", "Fresh"))
    stored: dict[str, Event] = {}  # the live account's events, in arrival order
    voided: set[str] = set()
    for kind, arg in ops:
        if kind == "append":
            batch = [
                _event(i, BASE_MS + minute * MIN_MS, value, "live", s=s)
                for i, minute, value, s in arg  # type: ignore[attr-defined]
            ]
            store.append(batch)
            for e in batch:
                if e.id not in stored and e.id not in voided:
                    stored[e.id] = e
        elif kind == "void_ids":
            ids = tuple(sorted({f"e{i}" for i in arg if f"e{i}" in stored}))  # type: ignore[attr-defined]
            if ids:
                store.void_events(VoidSelector("live", ids=ids), "p", None, NOW_MS)
                for i in ids:
                    voided.add(i)
                    del stored[i]
        elif kind == "amend":
            number, value = arg  # type: ignore[misc]
            old = stored.get(f"e{number}")
            if old is not None:
                new_id = f"r{len(voided)}"
                store.void_events(
                    VoidSelector("live", ids=(old.id,)),
                    "p",
                    None,
                    NOW_MS,
                    Amendment(float(value), new_id),
                )
                voided.add(old.id)
                del stored[old.id]
                # The replacement arrives now: later than every event stored so far.
                stored[new_id] = Event(
                    new_id, "live", "m", old.ts_ms, float(value), dimensions=old.dimensions
                )
        else:
            quarter, length, s = arg  # type: ignore[misc]
            start = BASE_MS + quarter * 15 * MIN_MS + 7 * MIN_MS
            end = start + length * 15 * MIN_MS
            dims = (("s", s),) if s else ()
            store.void_events(
                VoidSelector("live", metric="m", start_ms=start, end_ms=end, dimensions=dims),
                "p",
                None,
                NOW_MS,
            )
            for e in list(stored.values()):
                if start <= e.ts_ms < end and (s is None or e.dimensions["s"] == s):
                    voided.add(e.id)
                    del stored[e.id]
    survivors = [
        Event(e.id, "fresh", e.metric, e.ts_ms, e.value, dimensions=e.dimensions)
        for e in stored.values()
    ]
    store.append(survivors)
    assert sorted(e.id for e in store.iter_events(["live"])) == sorted(stored)
    windows_sets = [
        # whole days (day rollups), hours (hour rollups), and ragged ends (slots and raw)
        tuple(Window(d, BASE_MS + d * DAY_MS, BASE_MS + (d + 1) * DAY_MS) for d in range(3)),
        tuple(Window(h, BASE_MS + h * HOUR_MS, BASE_MS + (h + 1) * HOUR_MS) for h in range(72)),
        (Window(0, BASE_MS + 7 * MIN_MS, BASE_MS + 2 * DAY_MS + 53 * MIN_MS),),
    ]
    for windows in windows_sets:
        for group_by in ((), ("s",)):
            assert _report(store, "live", windows, group_by) == _report(
                store, "fresh", windows, group_by
            )


def test_an_account_deleted_by_another_process_takes_no_more_events_here(
    store: Store, request: pytest.FixtureRequest, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two stores on one database, as two processes are: once the row ids this one keeps have
    expired, an account the other deleted is refused here, and one it created again under
    the same id takes this one's events under its new row, where queries find them."""
    other = _same_database(store, request, db_path)
    try:
        store.create_account(Account("x", "X"))
        assert store.append([_event(1, BASE_MS, account="x")]).accepted == 1  # its row id kept
        other.delete_account("x")
        monkeypatch.setattr(rows, "ROW_IDS_KEPT_FOR", 0.0)
        with pytest.raises(NotFound, match="'x'"):
            store.append([_event(2, BASE_MS, account="x")])
        other.create_account(Account("x", "X again"))
        assert store.append([_event(3, BASE_MS, 5.0, account="x")]).accepted == 1
        assert _day(other, "x")[:2] == (1, 5.0)
    finally:
        other.close()


def _same_database(store: Store, request: pytest.FixtureRequest, db_path: Path) -> Store:
    """Another store on the database of ``store``, as another process would open it."""
    if isinstance(store, SQLiteStore):
        return SQLiteStore(db_path)
    if isinstance(store, PostgresStore):
        return PostgresStore(request.getfixturevalue("postgres_url"), pool_size=2)
    return open_store(request.getfixturevalue("clickhouse_home"))
