"""A question (Engine.run: the store's answer read and shaped) and an answer's buckets and
cells made as objects from its columns (model.BucketCells.buckets) run with the cyclic
collector paused (bulk.collector_paused): it is on again afterwards, whatever happened
meanwhile, a store's failure included, and left off when it was off."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from usagemeter import engine as engine_module
from usagemeter import model as model_module
from usagemeter.engine import Engine
from usagemeter.model import Account, Event, GroupValues, Query
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity, to_ms

T0 = datetime(2024, 11, 3, tzinfo=UTC)  # New York falls back this day


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(str(tmp_path / "c.db"))
    store.create_account(Account("a", "A"))
    store.append(
        [
            Event(
                f"e{i}",
                "a",
                "m",
                to_ms(T0 + timedelta(minutes=7 * i)),
                dimensions={"s": str(i % 3)},
            )
            for i in range(200)
        ]
    )
    yield store
    store.close()


def _hourly() -> Query:
    return Query(
        ("a",),
        "m",
        T0,
        T0 + timedelta(days=1),
        Granularity.HOUR,
        "America/New_York",
        group_by=("s",),
    )


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Whether the collector was on as each kind of object was made, by the engine or from
    the answer's columns."""
    made = model_module.made
    found: list[tuple[str, bool]] = []

    def watched(kind: type, *columns: object) -> list[object]:
        found.append((kind.__name__, gc.isenabled()))
        return made(kind, *columns)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "made", watched)
    monkeypatch.setattr(model_module, "made", watched)
    return found


def test_the_cells_are_made_with_the_collector_off_and_it_is_on_after(
    store: SQLiteStore, seen: list[tuple[str, bool]]
) -> None:
    assert gc.isenabled()
    result = Engine(store).run(_hourly())
    assert gc.isenabled()
    assert seen == [("Window", False)]  # made inside the question; no cell made yet
    assert len(result.buckets) == 24  # 24 hours across New York's fall back
    assert gc.isenabled()
    assert seen[1:] == [("GroupValues", False), ("ResultBucket", False)]
    assert result.buckets is result.buckets  # made once
    assert len(seen) == 3
    assert result.total == (200,) and sum(c.values[0] for c in result.totals) == 200
    assert sum(g.values[0] for b in result.buckets for g in b.groups) == 200


def test_the_collector_is_on_again_when_making_the_cells_fails(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(kind: type, *columns: object) -> list[object]:
        if kind is GroupValues:
            raise MemoryError("no room")
        return made(kind, *columns)  # type: ignore[arg-type]

    made = model_module.made
    monkeypatch.setattr(model_module, "made", failing)
    result = Engine(store).run(_hourly())
    with pytest.raises(MemoryError):
        result.buckets  # noqa: B018
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(
    store: SQLiteStore, seen: list[tuple[str, bool]]
) -> None:
    gc.disable()
    try:
        assert Engine(store).run(_hourly()).buckets
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert ("GroupValues", False) in seen


def test_the_store_answers_with_the_collector_off_and_it_is_on_after_a_failure(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    aggregate = store.aggregate
    during: list[bool] = []

    def watched(spec: object) -> object:
        during.append(gc.isenabled())
        return aggregate(spec)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "aggregate", watched)
    assert Engine(store).run(_hourly()).total == (200,)
    assert during == [False] and gc.isenabled()

    def failing(spec: object) -> object:
        raise OSError("disk gone")

    monkeypatch.setattr(store, "aggregate", failing)
    with pytest.raises(OSError):
        Engine(store).run(_hourly())
    assert gc.isenabled()
