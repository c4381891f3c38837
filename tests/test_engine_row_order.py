"""The engine's answer does not depend on the order of the store's rows: the ClickHouse
statement orders a grouped question's rows by group and window only so that the engine's
sorts are cheaper (chplan._select), and the other stores give theirs in any order."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usagemeter.engine import Engine
from usagemeter.meters import MeterRegistry
from usagemeter.model import Account, Aggregation, Event, Meter, Query
from usagemeter.store.base import AggregateColumns, AggregateRow, AggregateSpec
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity, to_ms

T0 = datetime(2024, 11, 2, tzinfo=UTC)  # New York falls back on the 3rd: a 25-hour day


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLiteStore]:
    store = SQLiteStore(str(tmp_path_factory.mktemp("order") / "o.db"))
    store.create_account(Account("a", "A"))
    store.create_account(Account("b", "B", "a"))
    store.append(
        [
            Event(
                f"e{i}",
                "a" if i % 3 else "b",
                "m",
                to_ms(T0 + timedelta(minutes=37 * i)),
                value=float(i % 11),
                dimensions={
                    **({"agent": "xyz"[i % 3]} if i % 4 else {}),
                    "s": f"s{i % 5}",
                },
            )
            for i in range(160)
        ]
    )
    yield store
    store.close()


class _Reordered:
    """A real store whose answers' rows are handed on in the order ``order`` gives them."""

    def __init__(self, store: SQLiteStore, order: st.DataObject) -> None:
        self.store = store
        self.order = order

    def raw_horizon(self) -> int | None:
        return self.store.raw_horizon()

    def aggregate(self, spec: AggregateSpec) -> list[AggregateRow]:
        rows = self.store.aggregate(spec)
        return self.order.draw(st.permutations(rows))

    def aggregate_columns(self, spec: AggregateSpec) -> AggregateColumns:
        return AggregateColumns.from_rows(self.aggregate(spec))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    order=st.data(),
    zone=st.sampled_from(["UTC", "America/New_York", "Asia/Kathmandu"]),
    granularity=st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.TOTAL]),
    aggregation=st.sampled_from(list(Aggregation)),
    group_by=st.sampled_from([(), ("agent",), ("subaccount",), ("agent", "subaccount")]),
)
def test_an_answer_is_the_same_whatever_order_the_stores_rows_come_in(
    store: SQLiteStore,
    order: st.DataObject,
    zone: str,
    granularity: Granularity,
    aggregation: Aggregation,
    group_by: tuple[str, ...],
) -> None:
    meters = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "s")})
    query = Query(
        ("a", "b"),
        "m",
        T0,
        T0 + timedelta(days=4),
        granularity,
        tz=zone,
        aggregations=(aggregation,),
        group_by=group_by,
    )
    expected = Engine(store, meters).run(query)
    assert Engine(_Reordered(store, order), meters).run(query) == expected  # type: ignore[arg-type]
