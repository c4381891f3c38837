"""An answer's buckets kept as columns (model.BucketCells) and written by the native API from
them (api/native.buckets_json): the response's bytes are those of round 11's rendering, which
walked a ResultBucket and a GroupValues per cell and a dict for each, in every zone, for
every aggregation, grouped or not, cut short by a limit or not, whole and fractional values."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usagemeter.api.native import _stamps, buckets_json, query_answer, query_json
from usagemeter.api.responses import number
from usagemeter.engine import Engine
from usagemeter.meters import MeterRegistry
from usagemeter.model import (
    Account,
    Aggregation,
    Event,
    GroupValues,
    Meter,
    Query,
    Result,
    ResultBucket,
)
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity, isoformat, to_ms

T0 = datetime(2024, 11, 2, tzinfo=UTC)  # New York falls back on the 3rd: a 25-hour day
# Whole values (written as integers), fractions, negatives, and whole values past 2**53.
VALUES = [1.0, 2.0, 0.5, 0.1, -3.0, 1e16, 2.0**60, 7.25, 0.0]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLiteStore]:
    store = SQLiteStore(str(tmp_path_factory.mktemp("columns") / "c.db"))
    store.create_account(Account("a", "A"))
    store.create_account(Account("b", "B", "a"))
    store.append(
        [
            Event(
                f"e{i}",
                "a" if i % 3 else "b",
                "m",
                to_ms(T0 + timedelta(minutes=41 * i)),
                value=VALUES[i % len(VALUES)],
                dimensions={
                    **({"agent": "xyz"[i % 3]} if i % 4 else {}),
                    "s": f"s{i % 5}",
                    **({"label": 'é "q" ✓'} if i % 7 == 0 else {}),
                },
            )
            for i in range(150)
        ]
    )
    yield store
    store.close()


def _as_round_11(result: Result) -> dict[str, Any]:
    """Round 11's native rendering, from the answer's buckets and cells as objects."""
    query = result.query
    last_end = result.buckets[-1].end if result.buckets else query.end
    truncated = query.limit is not None and last_end < query.end
    several = len(result.aggregations) > 1

    def values(group: GroupValues) -> dict[str, Any]:
        out: dict[str, Any] = {"group": group.as_dict(), "value": number(group.values[0])}
        if several:
            out["values"] = {
                a.value: number(v) for a, v in zip(result.aggregations, group.values, strict=True)
            }
        return out

    def bucket(b: ResultBucket) -> dict[str, Any]:
        return {
            "start": isoformat(b.start),
            "end": isoformat(b.end),
            "groups": [values(g) for g in b.groups],
        }

    return {
        "metric": query.metric,
        "aggregation": ",".join(a.value for a in result.aggregations),
        "accounts": list(query.accounts),
        "start": isoformat(query.start),
        "end": isoformat(query.end),
        "granularity": query.granularity.value,
        "tz": query.tz,
        "group_by": list(query.group_by),
        "buckets": [bucket(b) for b in result.buckets],
        "totals": [values(g) for g in result.totals],
        "total": number(result.total[0]),
        "truncated": truncated,
        "next_start": isoformat(last_end) if truncated else None,
    }


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    zone=st.sampled_from(
        ["UTC", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe", "Europe/Amsterdam"]
    ),
    # Amsterdam's and Monrovia's offsets had seconds once (+00:19:32, -00:44:30), which
    # msgspec would round: the boundaries are then written one by one.
    era=st.sampled_from([T0, datetime(1930, 3, 1, tzinfo=UTC), datetime(1971, 6, 1, tzinfo=UTC)]),
    millisecond=st.sampled_from([0, 7]),
    granularity=st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.TOTAL]),
    aggregations=st.lists(st.sampled_from(list(Aggregation)), min_size=1, max_size=3),
    group_by=st.sampled_from(
        [(), ("agent",), ("subaccount",), ("agent", "label"), ("label", "subaccount")]
    ),
    start_minutes=st.integers(-90, 3000),
    hours=st.integers(0, 110),
    limit=st.one_of(st.none(), st.integers(1, 40)),
)
def test_the_response_written_from_columns_is_round_11s_byte_for_byte(
    store: SQLiteStore,
    zone: str,
    granularity: Granularity,
    aggregations: list[Aggregation],
    group_by: tuple[str, ...],
    era: datetime,
    millisecond: int,
    start_minutes: int,
    hours: int,
    limit: int | None,
) -> None:
    meters = MeterRegistry({"m": Meter("m", Aggregation.UNIQUE_COUNT, "s")})
    if era != T0 and zone == "Asia/Kathmandu":
        zone = "Africa/Monrovia"
    start = era + timedelta(minutes=start_minutes, milliseconds=millisecond)
    query = Query(
        ("a", "b"),
        "m",
        start,
        start + timedelta(hours=hours, minutes=13 if millisecond else 0),
        granularity,
        tz=zone,
        aggregations=tuple(aggregations),
        group_by=group_by,
        limit=limit,
    )
    result = Engine(store, meters).run(query)
    expected = msgspec.json.encode(_as_round_11(result))
    assert msgspec.json.encode(query_answer(result)) == expected
    assert msgspec.json.encode(query_json(result)) == expected  # the CLI's, by dicts
    assert msgspec.json.decode(buckets_json(result)) == msgspec.json.decode(expected)["buckets"]


def test_boundaries_are_written_as_isoformat_writes_them() -> None:
    """msgspec's text for the common boundaries, isoformat's one by one for the others."""
    new_york, amsterdam = ZoneInfo("America/New_York"), ZoneInfo("Europe/Amsterdam")
    for cuts in (
        [datetime(2024, 11, 3, 5, tzinfo=UTC) + timedelta(hours=h) for h in range(4)],
        [
            datetime(2024, 11, 3, 5, tzinfo=UTC).astimezone(new_york) + timedelta(hours=h)
            for h in range(4)
        ],
        [datetime(1900, 1, 1, tzinfo=amsterdam), datetime(1900, 1, 2, tzinfo=amsterdam)],
        [
            datetime(2024, 1, 1, 0, 0, 0, 7000, tzinfo=new_york),
            datetime(2024, 1, 2, tzinfo=new_york),
        ],
        [],
    ):
        assert _stamps(cuts) == [msgspec.json.encode(isoformat(t)) for t in cuts]
    assert _stamps([datetime(1900, 1, 1, tzinfo=amsterdam)]) == [b'"1900-01-01T00:00:00+00:19:32"']


def test_the_cells_as_objects_are_the_columns_bucket_by_bucket(store: SQLiteStore) -> None:
    query = Query(
        ("a", "b"),
        "m",
        T0,
        T0 + timedelta(days=2),
        Granularity.HOUR,
        "America/New_York",
        aggregations=(Aggregation.COUNT,),
        group_by=("agent",),
    )
    result = Engine(store).run(query)
    cells = result.cells
    assert len(cells) == len(result.buckets) == 48  # New York's 01:00 twice, 48 hours all the same
    assert cells.bounds[0] == 0 and cells.bounds[-1] == len(cells.group_of) == len(cells.values)
    assert [(b.start, b.end) for b in result.buckets] == list(
        zip(cells.cuts[:-1], cells.cuts[1:], strict=True)
    )
    flat = [(g.group, g.values) for b in result.buckets for g in b.groups]
    assert flat == list(
        zip(map(cells.groups.__getitem__, cells.group_of), cells.values, strict=True)
    )
    assert cells.groups == [(("agent", v),) for v in ("x", "y", "z", None)]  # None last
    assert sum(v[0] for v in cells.values) == result.total[0] == 71  # e0..e70 in two days
    assert sum(1 for b in result.buckets if b.groups) >= 40  # an event every 41 minutes
