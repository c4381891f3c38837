"""The engine: buckets in a zone, groups, and totals that are right for every meter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usagemeter.engine import Engine
from usagemeter.model import Account, Aggregation, Event, Query
from usagemeter.store.base import AggregateRow, AggregateSpec
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity, buckets, isoformat, to_ms

T0 = datetime(2024, 11, 1, tzinfo=UTC)
ZONES = ["UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "Australia/Lord_Howe"]


def _store(path: object) -> SQLiteStore:
    store = SQLiteStore(str(path))
    store.create_account(Account("a", "A"))
    store.create_account(Account("b", "B", "a"))
    return store


def _query(**fields: object) -> Query:
    base: dict[str, object] = {
        "accounts": ("a", "b"),
        "metric": "m",
        "start": T0,
        "end": T0 + timedelta(days=7),
    }
    base.update(fields)
    return Query(**base)  # type: ignore[arg-type]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    offsets=st.lists(st.integers(0, 7 * 24 * 60), max_size=40),
    zone=st.sampled_from(ZONES),
    granularity=st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.MONTH]),
    start_shift=st.integers(0, 3 * 24 * 60),
)
def test_sum_buckets_add_up_to_the_total(
    tmp_path_factory: pytest.TempPathFactory,
    offsets: list[int],
    zone: str,
    granularity: Granularity,
    start_shift: int,
) -> None:
    store = _store(tmp_path_factory.mktemp("e") / "e.db")
    events = [
        Event(f"e{i}", "a" if i % 3 else "b", "m", to_ms(T0 + timedelta(minutes=m)), value=i + 1)
        for i, m in enumerate(offsets)
    ]
    store.append(events)
    start = T0 + timedelta(minutes=start_shift)
    result = Engine(store).run(
        _query(
            start=start,
            tz=zone,
            granularity=granularity,
            aggregations=(Aggregation.SUM, Aggregation.COUNT),
        )
    )
    inside = [e for e in events if to_ms(start) <= e.ts_ms < to_ms(T0 + timedelta(days=7))]
    bucket_sum = sum(g.values[0] for b in result.buckets for g in b.groups)
    bucket_count = sum(g.values[1] for b in result.buckets for g in b.groups)
    assert bucket_sum == result.total[0] == sum(e.value for e in inside)
    assert bucket_count == result.total[1] == len(inside)
    # Each event sits in the bucket whose [start, end) holds it.
    for e in inside:
        holders = [b for b in result.buckets if to_ms(b.start) <= e.ts_ms < to_ms(b.end)]
        assert len(holders) == 1 and holders[0].groups
    store.close()


def test_unique_count_total_is_distinct_over_the_range(tmp_path: object) -> None:
    store = _store(f"{tmp_path}/u.db")
    day = to_ms(T0)
    store.append(
        [
            Event("1", "a", "Sessions", day, dimensions={"session_id": "s1"}),
            Event("2", "a", "Sessions", day + 1000, dimensions={"session_id": "s2"}),
            Event("3", "a", "Sessions", day + 86_400_000, dimensions={"session_id": "s1"}),
            Event("4", "b", "Sessions", day + 86_400_000, dimensions={"session_id": "s3"}),
            Event("5", "a", "Sessions", day + 86_400_000),  # no session: not counted
        ]
    )
    result = Engine(store).run(_query(metric="Sessions"))
    per_day = [g.values[0] for b in result.buckets for g in b.groups]
    assert per_day == [2, 2]  # s1 s2 | s1 s3
    assert result.total == (3,)  # s1 s2 s3, not 4
    grouped = Engine(store).run(_query(metric="Sessions", group_by=("subaccount",)))
    assert {g.group: g.values[0] for g in grouped.totals} == {
        (("subaccount", "a"),): 2,
        (("subaccount", "b"),): 1,
    }
    assert grouped.total == (3,)
    store.close()


class _Counting(SQLiteStore):
    """A real SQLite store that counts the aggregate calls made of it."""

    calls = 0

    def aggregate(self, spec: AggregateSpec) -> list[AggregateRow]:
        self.calls += 1
        return super().aggregate(spec)


@pytest.mark.parametrize("metric", ["Sessions", "StorageBytes"])
@pytest.mark.parametrize("group_by", [(), ("subaccount",)])
def test_a_range_total_that_is_no_fold_of_the_buckets_costs_one_store_call(
    tmp_path: object, metric: str, group_by: tuple[str, ...]
) -> None:
    """Buckets, per-group totals and the overall total in one call: a distinct count used to
    read the account's raw events three times over."""
    store = _Counting(f"{tmp_path}/c.db")
    store.create_account(Account("a", "A"))
    store.create_account(Account("b", "B", "a"))
    day = to_ms(T0)
    store.append(
        [
            Event("1", "a", metric, day, value=5, dimensions={"session_id": "s1"}),
            Event("2", "b", metric, day + 86_400_000, value=7, dimensions={"session_id": "s1"}),
        ]
    )
    result = Engine(store).run(_query(metric=metric, group_by=group_by))
    assert store.calls == 1
    assert result.total == ((1,) if metric == "Sessions" else (7,))
    assert len(result.totals) == (2 if group_by else 1)
    store.close()


def test_latest_is_a_gauge_not_a_sum(tmp_path: object) -> None:
    store = _store(f"{tmp_path}/g.db")
    day = to_ms(T0)
    readings = [(0, 100), (3_600_000, 300), (86_400_000, 250), (86_400_000 + 60_000, 120)]
    store.append(
        [Event(f"r{i}", "a", "StorageBytes", day + t, value=v) for i, (t, v) in enumerate(readings)]
    )
    result = Engine(store).run(_query(metric="StorageBytes"))
    assert [b.groups[0].values[0] for b in result.buckets if b.groups] == [300, 120]
    assert result.total == (120,)
    # Over a window that ends before the last reading, the latest is the one before it.
    early = Engine(store).run(_query(metric="StorageBytes", end=T0 + timedelta(days=1, seconds=30)))
    assert early.total == (250,)
    store.close()


def test_max_min_fold_across_buckets(tmp_path: object) -> None:
    store = _store(f"{tmp_path}/m.db")
    day = to_ms(T0)
    store.append(
        [Event(f"{i}", "a", "lat", day + i * 86_400_000, value=v) for i, v in enumerate([5, 9, 2])]
    )
    for aggregation, expected in ((Aggregation.MAX, 9), (Aggregation.MIN, 2)):
        result = Engine(store).run(_query(metric="lat", aggregations=(aggregation,)))
        assert result.total == (expected,)
    store.close()


def test_limit_keeps_the_earliest_buckets(tmp_path: object) -> None:
    store = _store(f"{tmp_path}/l.db")
    store.append([Event(f"{i}", "a", "m", to_ms(T0) + i * 86_400_000) for i in range(7)])
    result = Engine(store).run(_query(limit=3))
    assert [b.start.day for b in result.buckets] == [1, 2, 3]
    assert result.total == (3,)
    store.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    zone=st.sampled_from([*ZONES, "America/Santiago", "Pacific/Chatham"]),
    granularity=st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.MONTH]),
    start_ms=st.integers(0, 400 * 86_400_000),
    span_ms=st.integers(1, 60 * 86_400_000),
    limit=st.none() | st.integers(1, 50),
)
def test_the_buckets_answered_are_the_zones_buckets_as_far_as_the_limit(
    tmp_path_factory: pytest.TempPathFactory,
    zone: str,
    granularity: Granularity,
    start_ms: int,
    span_ms: int,
    limit: int | None,
) -> None:
    # The engine makes its buckets from their boundaries (timewindows.bucket_edges): the
    # same instants, offsets and count as timewindows.buckets gives, cut at the limit, and
    # each event counted in the bucket whose milliseconds hold it.
    store = _store(tmp_path_factory.mktemp("b") / "b.db")
    start = datetime(2023, 10, 1, tzinfo=UTC) + timedelta(milliseconds=start_ms)
    end = start + timedelta(milliseconds=span_ms)
    stamps = [to_ms(start) + span_ms * i // 7 for i in range(7)]
    store.append([Event(f"e{i}", "a", "m", ms) for i, ms in enumerate(stamps)])
    query = _query(start=start, end=end, granularity=granularity, tz=zone, limit=limit)
    result = Engine(store).run(query)
    expected = buckets(start, end, granularity, ZoneInfo(zone))[:limit]
    assert [(isoformat(b.start), isoformat(b.end)) for b in result.buckets] == [
        (isoformat(b.start), isoformat(b.end)) for b in expected
    ]
    counted = [sum(b.start_ms <= ms < b.end_ms for ms in stamps) for b in expected]
    assert [b.groups[0].values[0] if b.groups else 0 for b in result.buckets] == counted
    store.close()


def test_group_by_key_and_dimension(tmp_path: object) -> None:
    from usagemeter.auth import issue_key
    from usagemeter.model import Scope

    store = _store(f"{tmp_path}/k.db")
    issue_key(store, "a", key_id="k1", scopes=[Scope.READ])
    t = to_ms(T0)
    store.append(
        [
            Event("1", "a", "m", t, key_id="k1", dimensions={"agent": "x"}),
            Event("2", "a", "m", t, key_id="k1", dimensions={"agent": "y"}),
            Event("3", "a", "m", t, dimensions={"agent": "x"}),
        ]
    )
    result = Engine(store).run(_query(group_by=("key", "agent"), granularity=Granularity.TOTAL))
    assert {g.group: g.values[0] for g in result.totals} == {
        (("key", "k1"), ("agent", "x")): 1,
        (("key", "k1"), ("agent", "y")): 1,
        (("key", None), ("agent", "x")): 1,
    }
    store.close()
