"""Tests for usagemeter.timewindows: worked zone examples, then Hypothesis invariants."""

from __future__ import annotations

import calendar
from datetime import UTC as PY_UTC
from datetime import date, datetime, timedelta, timezone
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usagemeter.timewindows import (
    SLOT_MS,
    UTC,
    BillingCycle,
    Bucket,
    Granularity,
    add_months,
    add_years,
    bucket_edges,
    buckets,
    from_ms,
    isoformat,
    parse_instant,
    parse_zone,
    preset_range,
    to_ms,
)

NY = ZoneInfo("America/New_York")
HOUR_MS = 3_600_000
TICK = timedelta(microseconds=1)
# Arithmetic on datetimes that share a zone is wall-clock arithmetic, so these tests step
# in UTC (utc(t) - TICK), never t - TICK on a zoned t.


def spans(bs: list[Bucket]) -> list[tuple[str, str]]:
    return [(isoformat(b.start), isoformat(b.end)) for b in bs]


def starts(bs: list[Bucket]) -> list[str]:
    return [isoformat(b.start) for b in bs]


def hours(b: Bucket) -> float:
    return (b.end_ms - b.start_ms) / HOUR_MS


def bk(start: str, end: str, g: Granularity, zone: ZoneInfo = UTC) -> list[Bucket]:
    """Buckets between two instants written as text; text without an offset is in ``zone``."""
    return buckets(parse_instant(start, zone), parse_instant(end, zone), g, zone)


def local_day(day: str, zone: ZoneInfo, g: Granularity) -> list[Bucket]:
    """The buckets of one local day in ``zone``."""
    start = parse_instant(day, zone)
    return buckets(start, Granularity.DAY.next_start(start), g, zone)


# -- examples: UTC -----------------------------------------------------------------------


def test_utc_days_hours_months() -> None:
    assert spans(bk("2024-01-01", "2024-01-03", Granularity.DAY)) == [
        ("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"),
        ("2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z"),
    ]
    hourly = bk("2024-01-01T22:00Z", "2024-01-02T01:00Z", Granularity.HOUR)
    assert starts(hourly) == [
        "2024-01-01T22:00:00Z",
        "2024-01-01T23:00:00Z",
        "2024-01-02T00:00:00Z",
    ]
    monthly = bk("2024-01-01", "2025-01-01", Granularity.MONTH)
    assert len(monthly) == 12
    assert spans(monthly)[1] == ("2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z")


def test_first_and_last_buckets_are_clipped() -> None:
    bs = bk("2024-01-15T12:00Z", "2024-04-10T06:30Z", Granularity.MONTH)
    assert spans(bs) == [
        ("2024-01-15T12:00:00Z", "2024-02-01T00:00:00Z"),
        ("2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"),
        ("2024-03-01T00:00:00Z", "2024-04-01T00:00:00Z"),
        ("2024-04-01T00:00:00Z", "2024-04-10T06:30:00Z"),
    ]
    # A range inside one bucket is that bucket, clipped at both ends.
    inner = bk("2024-01-01T10:15Z", "2024-01-01T10:45Z", Granularity.HOUR)
    assert spans(inner) == [("2024-01-01T10:15:00Z", "2024-01-01T10:45:00Z")]


def test_total_and_empty_ranges() -> None:
    start, end = parse_instant("2024-01-01T00:00Z"), parse_instant("2024-03-10T12:00Z")
    assert spans(buckets(start, end, Granularity.TOTAL, NY)) == [
        ("2023-12-31T19:00:00-05:00", "2024-03-10T08:00:00-04:00")
    ]
    for g in Granularity:
        assert buckets(start, start, g, NY) == []
        assert buckets(end, start, g, NY) == []


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        buckets(datetime(2024, 1, 1), datetime(2024, 1, 2, tzinfo=PY_UTC), Granularity.DAY, UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        Granularity.DAY.floor(datetime(2024, 1, 1))


def test_granularity_floor_and_next_start() -> None:
    t = parse_instant("2024-11-03T01:30:00-05:00").astimezone(NY)  # the second 01:30
    assert isoformat(Granularity.HOUR.floor(t)) == "2024-11-03T01:00:00-05:00"
    assert isoformat(Granularity.HOUR.next_start(t)) == "2024-11-03T02:00:00-05:00"
    assert isoformat(Granularity.DAY.floor(t)) == "2024-11-03T00:00:00-04:00"
    assert isoformat(Granularity.DAY.next_start(t)) == "2024-11-04T00:00:00-05:00"
    assert isoformat(Granularity.MONTH.floor(t)) == "2024-11-01T00:00:00-04:00"
    assert isoformat(Granularity.MONTH.next_start(t)) == "2024-12-01T00:00:00-05:00"
    with pytest.raises(ValueError):
        Granularity.TOTAL.floor(t)
    with pytest.raises(ValueError):
        Granularity.TOTAL.next_start(t)
    assert Granularity("day") is Granularity.DAY and Granularity.DAY.value == "day"


# -- examples: DST and odd offsets -------------------------------------------------------


def test_new_york_spring_forward_day_has_23_hours_and_no_2am() -> None:
    (day,) = local_day("2024-03-10", NY, Granularity.DAY)
    assert (isoformat(day.start), hours(day)) == ("2024-03-10T00:00:00-05:00", 23)
    hourly = local_day("2024-03-10", NY, Granularity.HOUR)
    assert len(hourly) == 23
    assert [b.start.hour for b in hourly[:4]] == [0, 1, 3, 4]
    assert spans(hourly)[1] == ("2024-03-10T01:00:00-05:00", "2024-03-10T03:00:00-04:00")
    assert all(hours(b) == 1 for b in hourly)


def test_new_york_fall_back_day_has_25_hours_and_two_1am_buckets() -> None:
    (day,) = local_day("2024-11-03", NY, Granularity.DAY)
    assert spans([day]) == [("2024-11-03T00:00:00-04:00", "2024-11-04T00:00:00-05:00")]
    assert hours(day) == 25
    hourly = local_day("2024-11-03", NY, Granularity.HOUR)
    assert len(hourly) == 25
    assert starts(hourly)[:4] == [
        "2024-11-03T00:00:00-04:00",
        "2024-11-03T01:00:00-04:00",
        "2024-11-03T01:00:00-05:00",
        "2024-11-03T02:00:00-05:00",
    ]
    assert all(hours(b) == 1 for b in hourly)


@pytest.mark.parametrize(("zone", "minute"), [("Asia/Kolkata", 30), ("Asia/Kathmandu", 15)])
def test_half_and_quarter_hour_zones_start_hours_off_the_utc_hour(zone: str, minute: int) -> None:
    bs = bk("2024-01-01T00:00Z", "2024-01-01T05:00Z", Granularity.HOUR, parse_zone(zone))
    assert bs[0].start_ms % HOUR_MS == 0  # clipped to the range start
    assert {b.start.astimezone(PY_UTC).minute for b in bs[1:]} == {minute}
    assert {b.start.minute for b in bs[1:]} == {0}
    assert hours(bs[1]) == 1


def test_budapest_month_starts_at_23_utc() -> None:
    bs = bk(
        "2024-02-15T00:00Z", "2024-04-15T00:00Z", Granularity.MONTH, parse_zone("Europe/Budapest")
    )
    assert starts(bs)[1:] == ["2024-03-01T00:00:00+01:00", "2024-04-01T00:00:00+02:00"]
    assert isoformat(bs[1].start.astimezone(UTC)) == "2024-02-29T23:00:00Z"
    assert isoformat(bs[2].start.astimezone(UTC)) == "2024-03-31T22:00:00Z"


@pytest.mark.parametrize(
    ("zone", "day", "start", "next_day"),
    [
        # Clocks jump from 00:00 straight to 01:00, so midnight never happens.
        (
            "America/Santiago",
            "2024-09-08",
            "2024-09-08T01:00:00-03:00",
            "2024-09-09T00:00:00-03:00",
        ),
        ("Asia/Beirut", "2024-03-31", "2024-03-31T01:00:00+03:00", "2024-04-01T00:00:00+03:00"),
    ],
)
def test_day_without_a_midnight_starts_at_the_jump(
    zone: str, day: str, start: str, next_day: str
) -> None:
    tz = parse_zone(zone)
    jump = parse_instant(day, tz)
    assert isoformat(jump) == start
    bs = buckets(
        from_ms(to_ms(jump) - HOUR_MS), from_ms(to_ms(jump) + 30 * HOUR_MS), Granularity.DAY, tz
    )
    assert [(isoformat(b.start), hours(b)) for b in bs[1:]] == [(start, 23), (next_day, 7)]
    assert isoformat(Granularity.DAY.floor(from_ms(to_ms(jump) + 5 * HOUR_MS, tz))) == start
    assert isoformat(Granularity.HOUR.floor(jump)) == start
    assert isoformat(Granularity.DAY.next_start(from_ms(to_ms(jump) - 1, tz))) == start


def test_clock_going_back_across_midnight_keeps_the_day_whole() -> None:
    # Goose Bay, 1990-10-28: at 00:01 -03:00 clocks went back to 23:01 -04:00 on the 27th.
    tz = parse_zone("America/Goose_Bay")
    bs = bk("1990-10-27T00:00-03:00", "1990-10-30T00:00-04:00", Granularity.DAY, tz)
    assert [(isoformat(b.start), hours(b)) for b in bs] == [
        ("1990-10-27T00:00:00-03:00", 24),
        ("1990-10-28T00:00:00-03:00", 25),
        ("1990-10-29T00:00:00-04:00", 24),
    ]
    # 23:30 -04:00 on the 27th comes after the 28th began, so it belongs to the 28th.
    repeated = parse_instant("1990-10-27T23:30:00-04:00").astimezone(tz)
    assert isoformat(Granularity.DAY.floor(repeated)) == "1990-10-28T00:00:00-03:00"
    assert isoformat(Granularity.DAY.next_start(repeated)) == "1990-10-29T00:00:00-04:00"


def test_skipped_date_gets_no_bucket() -> None:
    # Samoa crossed the date line: 2011-12-29 23:59:59 -10:00 was followed by 12-31 00:00 +14:00.
    apia = parse_zone("Pacific/Apia")
    start, end = parse_instant("2011-12-29", apia), parse_instant("2012-01-01", apia)
    bs = buckets(start, end, Granularity.DAY, apia)
    assert starts(bs) == ["2011-12-29T00:00:00-10:00", "2011-12-31T00:00:00+14:00"]
    assert [hours(b) for b in bs] == [24, 24]
    assert isoformat(parse_instant("2011-12-30", apia)) == "2011-12-31T00:00:00+14:00"


def test_offset_change_at_midnight_splits_the_hour() -> None:
    # Kathmandu, 1986-01-01: 00:00 +05:30 became 00:15 +05:45; the day starts there.
    tz = parse_zone("Asia/Kathmandu")
    hourly = bk("1985-12-31T23:00+05:30", "1986-01-01T02:00+05:45", Granularity.HOUR, tz)
    assert [(isoformat(b.start), hours(b)) for b in hourly] == [
        ("1985-12-31T23:00:00+05:30", 1),
        ("1986-01-01T00:15:00+05:45", 0.75),
        ("1986-01-01T01:00:00+05:45", 1),
    ]
    assert isoformat(Granularity.DAY.floor(hourly[2].start)) == "1986-01-01T00:15:00+05:45"


def test_lord_howe_half_hour_shift_makes_a_90_minute_hour() -> None:
    tz = parse_zone("Australia/Lord_Howe")
    for day, n in (("2024-04-07", 24), ("2024-10-06", 23)):
        hourly = local_day(day, tz, Granularity.HOUR)
        assert len(hourly) == n
        assert [hours(b) for b in hourly[:3]] == [1, 1.5, 1]


# -- calendar arithmetic ------------------------------------------------------------------


def test_add_months_and_years_clamp_the_day() -> None:
    assert add_months(date(2024, 1, 31), 1) == date(2024, 2, 29)
    assert add_months(date(2023, 1, 31), 1) == date(2023, 2, 28)
    assert add_months(date(2024, 3, 31), -1) == date(2024, 2, 29)
    assert add_months(date(2024, 1, 31), 13) == date(2025, 2, 28)
    assert add_months(date(2024, 1, 15), -1) == date(2023, 12, 15)
    assert add_months(date(2024, 5, 31), 0) == date(2024, 5, 31)
    assert add_years(date(2024, 2, 29), 1) == date(2025, 2, 28)
    assert add_years(date(2024, 2, 29), 4) == date(2028, 2, 29)
    assert add_years(date(2024, 2, 29), -1) == date(2023, 2, 28)


def test_presets() -> None:
    today = date(2024, 5, 31)
    assert preset_range("7-days", today) == (date(2024, 5, 24), today)
    assert preset_range("30-days", today) == (date(2024, 5, 1), today)
    assert preset_range("3-months", today) == (date(2024, 2, 29), today)
    with pytest.raises(ValueError, match="'7-days', '30-days', '3-months'"):
        preset_range("1-week", today)


def test_monthly_cycle_anchored_on_the_31st() -> None:
    leap = BillingCycle(date(2024, 1, 31))
    assert leap.containing(date(2024, 2, 15)) == (date(2024, 1, 31), date(2024, 2, 29))
    assert leap.containing(date(2024, 2, 29)) == (date(2024, 2, 29), date(2024, 3, 31))
    assert leap.containing(date(2024, 3, 30)) == (date(2024, 2, 29), date(2024, 3, 31))
    assert leap.containing(date(2024, 3, 31)) == (date(2024, 3, 31), date(2024, 4, 30))
    assert leap.containing(date(2024, 5, 1)) == (date(2024, 4, 30), date(2024, 5, 31))
    common = BillingCycle(date(2023, 1, 31))
    assert common.containing(date(2023, 2, 28)) == (date(2023, 2, 28), date(2023, 3, 31))
    assert common.containing(date(2023, 2, 27)) == (date(2023, 1, 31), date(2023, 2, 28))


def test_cycle_on_and_before_the_anchor() -> None:
    cycle = BillingCycle(date(2024, 3, 15))
    assert cycle.containing(date(2024, 3, 15)) == (date(2024, 3, 15), date(2024, 4, 15))
    assert cycle.containing(date(2024, 3, 14)) == (date(2024, 2, 15), date(2024, 3, 15))
    assert BillingCycle(date(2024, 1, 31)).containing(date(2024, 1, 30)) == (
        date(2023, 12, 31),
        date(2024, 1, 31),
    )


def test_yearly_cycles_and_a_feb_29_anchor() -> None:
    cycle = BillingCycle(date(2024, 2, 29), "year")
    assert cycle.containing(date(2024, 2, 29)) == (date(2024, 2, 29), date(2025, 2, 28))
    assert cycle.containing(date(2025, 3, 1)) == (date(2025, 2, 28), date(2026, 2, 28))
    assert cycle.containing(date(2028, 2, 28)) == (date(2027, 2, 28), date(2028, 2, 29))
    assert cycle.containing(date(2028, 2, 29)) == (date(2028, 2, 29), date(2029, 2, 28))
    assert cycle.containing(date(2024, 2, 28)) == (date(2023, 2, 28), date(2024, 2, 29))
    monthly = BillingCycle(date(2024, 2, 29))
    assert monthly.containing(date(2024, 3, 30)) == (date(2024, 3, 29), date(2024, 4, 29))


def test_billing_cycle_validation() -> None:
    with pytest.raises(ValueError, match="'month' or 'year'"):
        BillingCycle(date(2024, 1, 1), "week")
    with pytest.raises(ValueError, match="not a datetime"):
        BillingCycle(datetime(2024, 1, 1, tzinfo=PY_UTC))


# -- parsing and formatting ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "zone", "expected"),
    [
        ("2024-01-02T03:04:05Z", UTC, "2024-01-02T03:04:05Z"),
        ("2024-01-02t03:04:05z", UTC, "2024-01-02T03:04:05Z"),
        ("2024-01-02 03:04:05.123+05:30", UTC, "2024-01-02T03:04:05.123+05:30"),
        ("2024-01-02T03:04:05-08:00", NY, "2024-01-02T03:04:05-08:00"),
        ("2024-01-02T03:04", UTC, "2024-01-02T03:04:00Z"),
        ("2024-07-02T12:00:00", NY, "2024-07-02T12:00:00-04:00"),
        ("2024-01-02", NY, "2024-01-02T00:00:00-05:00"),
        ("2024-03-10T02:30", NY, "2024-03-10T03:30:00-04:00"),  # skipped: read before the jump
        ("2024-11-03T01:30", NY, "2024-11-03T01:30:00-04:00"),  # repeated: first occurrence
        ("1704067200000", UTC, "2024-01-01T00:00:00Z"),
        ("1704067200000", NY, "2023-12-31T19:00:00-05:00"),
        ("-1500", UTC, "1969-12-31T23:59:58.500Z"),
        (" 2024-01-02 ", UTC, "2024-01-02T00:00:00Z"),
    ],
)
def test_parse_instant_forms(text: str, zone: ZoneInfo, expected: str) -> None:
    t = parse_instant(text, zone)
    assert t.tzinfo is not None
    assert isoformat(t) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2024-13-01",
        "2024-02-30",
        "2024-01-01T25:00Z",
        "1.5",
        "2024-01-02T03:04:05+5",
        "2024-01",
        "1e9",
        "99999999999999999999",
    ],
)
def test_parse_instant_errors(text: str) -> None:
    with pytest.raises(ValueError, match="invalid instant"):
        parse_instant(text)


def test_parse_zone() -> None:
    assert parse_zone("America/New_York") is NY
    assert parse_zone("UTC").key == "UTC"
    with pytest.raises(ValueError, match=r"empty.*America/New_York"):
        parse_zone("")


@pytest.mark.parametrize(
    "name",
    ["Mars/Olympus", "../etc", "/etc/passwd", "America", "zone.tab", "America/../UTC", "New York"],
)
def test_parse_zone_errors_name_the_zone_and_an_example(name: str) -> None:
    with pytest.raises(ValueError, match="America/New_York") as info:
        parse_zone(name)
    assert repr(name) in str(info.value)


def test_isoformat() -> None:
    assert isoformat(datetime(2024, 1, 2, tzinfo=PY_UTC)) == "2024-01-02T00:00:00Z"
    assert isoformat(datetime(2024, 1, 2, tzinfo=UTC)) == "2024-01-02T00:00:00Z"
    assert isoformat(datetime(2024, 3, 10, tzinfo=NY)) == "2024-03-10T00:00:00-05:00"
    assert (
        isoformat(datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=PY_UTC))
        == "2024-01-02T03:04:05.678Z"
    )
    assert (
        isoformat(datetime(2024, 1, 2, tzinfo=ZoneInfo("Europe/London"))) == "2024-01-02T00:00:00Z"
    )
    assert (
        isoformat(datetime(2024, 1, 2, tzinfo=ZoneInfo("Pacific/Chatham")))
        == "2024-01-02T00:00:00+13:45"
    )
    assert isoformat(datetime(1880, 1, 1, tzinfo=NY)) == "1880-01-01T00:00:00-04:56:02"
    with pytest.raises(ValueError):
        isoformat(datetime(2024, 1, 2))


def test_epoch_milliseconds() -> None:
    assert to_ms(datetime(2024, 1, 1, tzinfo=NY)) == 1704085200000
    assert to_ms(datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=PY_UTC)) == -1  # floored
    big = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=PY_UTC)
    assert to_ms(big) == 253402300799999 and from_ms(253402300799999) == big
    assert isoformat(from_ms(1704085200000, NY)) == "2024-01-01T00:00:00-05:00"
    assert from_ms(0).tzinfo is UTC
    with pytest.raises(ValueError, match="out of range"):
        from_ms(10**18)
    assert Bucket(from_ms(5), from_ms(7)).start_ms == 5


# -- properties ---------------------------------------------------------------------------

ZONES = [
    ZoneInfo(name)
    for name in (
        "America/New_York",
        "Europe/London",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "Australia/Lord_Howe",
        "America/Santiago",
        "Pacific/Chatham",
        "UTC",
    )
]
LO_MS = to_ms(datetime(1971, 1, 1, tzinfo=PY_UTC))
HI_MS = to_ms(datetime(2037, 1, 1, tzinfo=PY_UTC))
MAX_SPAN_MS = {
    Granularity.HOUR: 10 * 24 * HOUR_MS,
    Granularity.DAY: 200 * 24 * HOUR_MS,
    Granularity.MONTH: 6 * 366 * 24 * HOUR_MS,
    Granularity.TOTAL: 366 * 24 * HOUR_MS,
}
# Arbitrary instants, plus ones on 15-minute slots so that ranges often start on a boundary.
instants_ms = st.one_of(
    st.integers(LO_MS, HI_MS),
    st.integers(LO_MS // SLOT_MS, HI_MS // SLOT_MS).map(lambda n: n * SLOT_MS),
)
input_zones = st.sampled_from([UTC, *ZONES, timezone(timedelta(hours=-3)), PY_UTC])


def utc(t: datetime) -> datetime:
    return t.astimezone(PY_UTC)


@st.composite
def ranges(draw: st.DrawFn, g: Granularity) -> tuple[datetime, datetime, ZoneInfo]:
    """A range of up to MAX_SPAN_MS[g], its ends in assorted tzinfos, and a query zone."""
    start = draw(instants_ms)
    end = start + draw(st.integers(0, MAX_SPAN_MS[g]))
    return (
        from_ms(start).astimezone(draw(input_zones)),
        from_ms(end).astimezone(draw(input_zones)),
        draw(st.sampled_from(ZONES)),
    )


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(Granularity)), st.data())
def test_buckets_partition_the_range(g: Granularity, data: st.DataObject) -> None:
    start, end, zone = data.draw(ranges(g))
    bs = buckets(start, end, g, zone)
    if utc(start) == utc(end):
        assert bs == []
        return
    assert utc(bs[0].start) == utc(start) and utc(bs[-1].end) == utc(end)
    for a, b in pairwise(bs):
        assert utc(a.end) == utc(b.start)
    for b in bs:
        assert utc(b.start) < utc(b.end)
        assert b.start.tzinfo is zone and b.end.tzinfo is zone
    # Every sampled zone's offsets since 1971 are whole quarter hours, so slots suffice.
    assert all(b.start_ms % SLOT_MS == 0 for b in bs[1:])
    if g is Granularity.TOTAL:
        assert len(bs) == 1


@settings(max_examples=120, deadline=None)
@given(st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.MONTH]), st.data())
def test_buckets_agree_with_floor_and_next_start(g: Granularity, data: st.DataObject) -> None:
    start, end, zone = data.draw(ranges(g))
    bs = buckets(start, end, g, zone)
    for i, b in enumerate(bs):
        aligned_start = g.floor(b.start)
        assert aligned_start.tzinfo is zone
        assert utc(aligned_start) <= utc(b.start)
        if i > 0:
            assert utc(aligned_start) == utc(b.start)
        nxt = g.next_start(b.start)
        if i < len(bs) - 1:
            assert utc(nxt) == utc(b.end)
        else:
            assert utc(nxt) >= utc(b.end)
        assert utc(g.floor((utc(b.end) - TICK).astimezone(zone))) == utc(aligned_start)


@settings(max_examples=120, deadline=None)
@given(st.sampled_from([Granularity.DAY, Granularity.MONTH]), st.data())
def test_day_and_month_buckets_hold_one_local_date(g: Granularity, data: st.DataObject) -> None:
    start, end, zone = data.draw(ranges(g))
    bs = buckets(start, end, g, zone)

    def key(t: datetime) -> tuple[int, ...]:
        local = t.astimezone(zone)
        return (
            (local.year, local.month)
            if g is Granularity.MONTH
            else (local.year, local.month, local.day)
        )

    for i, b in enumerate(bs):
        middle = utc(b.start) + (utc(b.end) - utc(b.start)) / 2
        assert key(b.start) == key(middle) == key(utc(b.end) - TICK)
        if i > 0:  # a bucket starts at the first instant of its date
            assert key(utc(b.start) - TICK) != key(b.start)
        if g is Granularity.DAY and 0 < i < len(bs) - 1:
            assert 22 <= hours(b) <= 26


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_hour_buckets_start_on_the_hour_or_at_a_day_start(data: st.DataObject) -> None:
    start, end, zone = data.draw(ranges(Granularity.HOUR))
    bs = buckets(start, end, Granularity.HOUR, zone)
    for b in bs[1:]:
        on_the_hour = (b.start.minute, b.start.second, b.start.microsecond) == (0, 0, 0)
        assert on_the_hour or utc(Granularity.DAY.floor(b.start)) == utc(b.start)
    assert all(0 < hours(b) <= 2 for b in bs)


@settings(max_examples=200, deadline=None)
@given(
    instants_ms,
    st.sampled_from(ZONES),
    st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.MONTH]),
)
def test_floor_and_next_start_bracket_an_instant(ms: int, zone: ZoneInfo, g: Granularity) -> None:
    t = from_ms(ms, zone)
    lo, hi = g.floor(t), g.next_start(t)
    assert utc(lo) <= utc(t) < utc(hi)
    assert utc(g.floor(lo)) == utc(lo) and utc(g.floor(hi)) == utc(hi)
    assert utc(g.next_start(lo)) == utc(hi)


dates = st.dates(date(1971, 1, 1), date(2037, 12, 31))


@settings(max_examples=300, deadline=None)
@given(dates, dates, st.sampled_from(["month", "year"]))
def test_billing_cycles_contain_the_day_and_are_contiguous(
    anchor: date, day: date, period: str
) -> None:
    cycle = BillingCycle(anchor, period)
    start, end = cycle.containing(day)
    assert start <= day < end
    assert cycle.containing(end)[0] == end
    assert cycle.containing(start - timedelta(days=1))[1] == start
    # Both ends are cycle starts: the anchor's day clamped to the month, a period apart.
    step = 1 if period == "month" else 12
    for edge in (start, end):
        assert edge.day == min(anchor.day, calendar.monthrange(edge.year, edge.month)[1])
        assert (edge.month - anchor.month) % step == 0
    assert (end.year - start.year) * 12 + end.month - start.month == step


@settings(max_examples=300, deadline=None)
@given(dates.filter(lambda d: d.day <= 28), st.integers(-600, 600))
def test_add_months_round_trip(d: date, n: int) -> None:
    assert add_months(add_months(d, n), -n) == d
    assert add_months(d, n).day == d.day


@settings(max_examples=200, deadline=None)
@given(instants_ms, st.sampled_from(ZONES))
def test_isoformat_parse_instant_round_trip(ms: int, zone: ZoneInfo) -> None:
    t = from_ms(ms, zone)
    assert to_ms(t) == ms
    assert to_ms(parse_instant(isoformat(t))) == ms
    assert to_ms(parse_instant(str(ms))) == ms


def stepped(start: datetime, end: datetime, g: Granularity, zone: ZoneInfo) -> list[datetime]:
    """The boundaries of [start, end) found one bucket at a time by next_start: the
    reference bucket_edges' day-at-a-time hours are checked against."""
    cuts = [start.astimezone(zone)]
    while True:
        t = g.next_start(cuts[-1])
        if utc(t) >= utc(end):
            return [*cuts, end.astimezone(zone)]
        cuts.append(t)


def assert_edges_match(start: datetime, end: datetime, g: Granularity, zone: ZoneInfo) -> None:
    cuts, edges = bucket_edges(start, end, g, zone)
    expected = stepped(start, end, g, zone)
    # isoformat shows the offset too: a repeated hour's second reading (fold) included.
    assert [isoformat(t) for t in cuts] == [isoformat(t) for t in expected]
    assert all(t.tzinfo is zone for t in cuts)
    assert edges == [to_ms(t) for t in expected]
    assert [(b.start, b.end) for b in buckets(start, end, g, zone)] == list(pairwise(cuts))


@settings(max_examples=120, deadline=None)
@given(st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.MONTH]), st.data())
def test_bucket_edges_equal_stepping_one_bucket_at_a_time(
    g: Granularity, data: st.DataObject
) -> None:
    start, end, zone = data.draw(ranges(g))
    if utc(start) >= utc(end):
        assert bucket_edges(start, end, g, zone) == ([], [])
        return
    assert_edges_match(start, end, g, zone)


@pytest.mark.parametrize(
    ("zone", "around"),
    [
        ("America/New_York", "2024-11-03T06:00:00Z"),  # fall back: 01:00 twice
        ("America/New_York", "2024-03-10T07:00:00Z"),  # spring forward: no 02:00
        ("Australia/Lord_Howe", "2024-04-06T15:00:00Z"),  # 30 minutes back
        ("Australia/Lord_Howe", "2024-10-05T15:30:00Z"),  # 30 minutes forward
        ("Asia/Kathmandu", "1985-12-31T18:30:00Z"),  # +05:30 to +05:45 at midnight
        ("Pacific/Chatham", "2024-04-06T14:00:00Z"),  # +13:45 to +12:45
        ("America/Santiago", "2024-09-08T04:00:00Z"),  # midnight skipped
        ("Asia/Kolkata", "2024-06-01T00:00:00Z"),
    ],
)
@pytest.mark.parametrize("minute", [0, 7, 15, 30, 45])
def test_bucket_edges_of_hours_across_an_offset_change(zone: str, around: str, minute: int) -> None:
    # Several days before and after, starting off the hour and ending off it: the days
    # made at a stroke, the day of the change hour by hour, the clipped ends.
    at = parse_instant(around)
    start = at - timedelta(days=3, minutes=minute)
    end = at + timedelta(days=2, hours=5, minutes=minute, milliseconds=3)
    assert_edges_match(start, end, Granularity.HOUR, ZoneInfo(zone))
