"""AVG: the engine's sum over count, exact over any range, bucket, zone and group."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import event
from usagemeter.engine import Engine
from usagemeter.meters import MeterRegistry, parse_aggregation
from usagemeter.model import Account, Aggregation, Event, Meter, Query
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity, to_ms

T0 = datetime(2024, 11, 1, tzinfo=UTC)
ZONES = ["UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    readings=st.lists(
        st.tuples(st.integers(0, 5 * 24 * 60), st.integers(-50, 500), st.sampled_from("xy")),
        max_size=30,
    ),
    zone=st.sampled_from(ZONES),
    granularity=st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.MONTH]),
    start_shift=st.integers(0, 2 * 24 * 60 * 60),  # seconds: ragged starts read raw events
)
def test_avg_is_the_mean_of_the_events_in_each_bucket_and_in_the_range(
    tmp_path_factory: pytest.TempPathFactory,
    readings: list[tuple[int, int, str]],
    zone: str,
    granularity: Granularity,
    start_shift: int,
) -> None:
    store = SQLiteStore(str(tmp_path_factory.mktemp("avg") / "avg.db"))
    store.create_account(Account("a", "A"))
    events = [
        Event(
            f"e{i}",
            "a",
            "latency",
            to_ms(T0 + timedelta(minutes=m)),
            value=v,
            dimensions={"region": r},
        )
        for i, (m, v, r) in enumerate(readings)
    ]
    store.append(events)
    start, end = T0 + timedelta(seconds=start_shift), T0 + timedelta(days=6)
    query = Query(
        accounts=("a",),
        metric="latency",
        start=start,
        end=end,
        granularity=granularity,
        tz=zone,
        aggregations=(Aggregation.AVG, Aggregation.COUNT),
        group_by=("region",),
    )
    result = Engine(store).run(query)

    def inside(lo: datetime, hi: datetime, region: str | None = None) -> list[float]:
        return [
            e.value
            for e in events
            if to_ms(lo) <= e.ts_ms < to_ms(hi) and region in (None, e.dimensions["region"])
        ]

    for bucket in result.buckets:
        for group in bucket.groups:
            region = group.as_dict()["region"]
            expected = inside(bucket.start, bucket.end, region)
            assert math.isclose(group.values[0], _mean(expected), abs_tol=1e-9)
            assert group.values[1] == len(expected)
    for group in result.totals:
        expected = inside(start, end, group.as_dict()["region"])
        assert math.isclose(group.values[0], _mean(expected), abs_tol=1e-9)
    assert math.isclose(result.total[0], _mean(inside(start, end)), abs_tol=1e-9)
    store.close()


def test_avg_as_a_meter_and_beside_a_gauge(tmp_path: object) -> None:
    """An avg meter is the metric's default; beside a non-additive aggregation its total is
    still sum over count of the whole range."""
    store = SQLiteStore(f"{tmp_path}/m.db")
    store.create_account(Account("a", "A"))
    day = to_ms(T0)
    store.append(
        [
            Event(f"{i}", "a", "cpu", day + t, value=v)
            for i, (t, v) in enumerate([(0, 10), (1000, 20), (86_400_000, 90)])
        ]
    )
    engine = Engine(store, MeterRegistry({"cpu": Meter("cpu", Aggregation.AVG)}))
    query = Query(accounts=("a",), metric="cpu", start=T0, end=T0 + timedelta(days=3))
    result = engine.run(query)
    assert [b.groups[0].values for b in result.buckets if b.groups] == [(15,), (90,)]
    assert result.total == (40,)  # (10 + 20 + 90) / 3, not (15 + 90) / 2
    both = engine.run(
        Query(
            accounts=("a",),
            metric="cpu",
            start=T0,
            end=T0 + timedelta(days=3),
            aggregations=(Aggregation.LATEST, Aggregation.AVG),
        )
    )
    assert both.total == (90, 40)
    empty = engine.run(
        Query(
            accounts=("a",), metric="cpu", start=T0 + timedelta(days=5), end=T0 + timedelta(days=6)
        )
    )
    assert empty.total == (0,) and not any(b.groups for b in empty.buckets)
    store.close()


@pytest.mark.usefixtures("tenants")
def test_avg_in_the_native_query(client: TestClient, send: Any, op: Any) -> None:
    send(
        event("1", "root", "cpu", "2025-01-15T10:00:00Z", value=10),
        event("2", "root", "cpu", "2025-01-15T11:00:00Z", value=30),
        event("3", "root", "cpu", "2025-01-16T10:00:00Z", value=50),
    )
    response = client.get(
        "/v1/query",
        params={
            "metric": "cpu",
            "account": "root",
            "start": "2025-01-15",
            "end": "2025-01-17",
            "aggregation": "avg",
        },
        headers=op,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [b["groups"][0]["value"] for b in body["buckets"]] == [20, 50]
    assert body["total"] == 30
    assert parse_aggregation("avg") == (Aggregation.AVG, None)
    with pytest.raises(ValueError, match="avg"):
        parse_aggregation("mean")
