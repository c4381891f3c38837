"""Time windows: ranges, presets, billing cycles and zone-aligned buckets.

Every endpoint turns its parameters into instants and buckets here, so a New York day, a
Kolkata hour and a billing month mean the same thing everywhere (DESIGN.md, "Time is the
hard part"). Ranges are half-open ``[start, end)``.

Arithmetic is done on UTC instants: Python subtracts and compares datetimes that share a
tzinfo by wall clock, wrong across a DST change (New York 2024-11-03 00:00 to 2024-11-04
00:00 is 25 hours; the wall difference says 24). Results are expressed in the query zone.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC as _UTC
from datetime import date, datetime, time, timedelta, tzinfo
from enum import StrEnum
from itertools import accumulate, pairwise, repeat
from operator import add
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: Rollup grain. Every UTC offset in use since 1979 (when Kiritimati left -10:40) is a
#: multiple of 15 minutes (+05:45 Kathmandu, +12:45 Chatham), so every bucket boundary
#: falls on a slot and 15-minute rollups regroup exactly into any zone's buckets.
SLOT_MS: int = 15 * 60 * 1000

UTC = ZoneInfo("UTC")

_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_HOUR = timedelta(hours=1)
_HOUR_MS = 3_600_000
_MS = timedelta(milliseconds=1)
_TICK = timedelta(microseconds=1)
_DAY = timedelta(days=1)
_MIDNIGHT = time()
_ZERO = timedelta(0)
_ZONE_EXAMPLE = "use an IANA zone name such as 'America/New_York'"


def _aware(t: datetime, what: str) -> tzinfo:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {t.isoformat()}")
    return t.tzinfo


def _split(t: datetime, g: Granularity) -> tuple[tzinfo, datetime]:
    """t's zone and t as a UTC instant, for aligning to ``g``."""
    zone = _aware(t, "t")
    if g is Granularity.TOTAL:
        raise ValueError("the total granularity has no bucket boundaries")
    return zone, t.astimezone(_UTC)


def _into_hour(w: datetime) -> timedelta:
    return timedelta(minutes=w.minute, seconds=w.second, microseconds=w.microsecond)


def _transition(lo: datetime, hi: datetime, zone: tzinfo) -> datetime:
    """The one offset change in ``(lo, hi]``, bisected to the microsecond (zoneinfo keeps
    its transition list private; changes are a week or more apart in tzdata)."""
    before = lo.astimezone(zone).utcoffset()
    while hi - lo > _TICK:
        mid = lo + (hi - lo) // 2
        if mid.astimezone(zone).utcoffset() == before:
            lo = mid
        else:
            hi = mid
    return hi


def _unit_start(d: date, zone: tzinfo) -> datetime:
    """First instant whose local date is ``d`` or later (a UTC datetime)."""
    # fold=0 picks the first of a repeated midnight, the instant the day or month begins.
    # Europe/Budapest is +01:00 in winter, so March 2024 starts at 2024-02-29T23:00Z.
    local = datetime.combine(d, _MIDNIGHT, zone)
    u = local.astimezone(_UTC)
    # Datetimes sharing a tzinfo subtract by wall clock (here and in buckets() this is on
    # purpose): a zero difference means midnight really occurs at ``u``.
    if u.astimezone(zone) - local == _ZERO:
        return u
    # Midnight is skipped by a jump forward, so the day starts at the jump. Santiago,
    # 2024-09-08: clocks go from 00:00 -04:00 straight to 01:00 -03:00 at 04:00Z, so that
    # day begins at 01:00-03:00 (04:00Z) and is 23 hours long. fold=1 reads the skipped
    # time with the later offset, which lands just before the jump (03:00Z here).
    return _transition(local.replace(fold=1).astimezone(_UTC), u, zone)


def _step(d: date, months: bool, n: int = 1) -> date:
    return add_months(d, n) if months else d + _DAY * n


def _day_next(u: datetime, zone: tzinfo, months: bool) -> tuple[date, datetime]:
    """The first day (or month) that starts after instant ``u``, and its start."""
    d = u.astimezone(zone).date()
    d = _step(d.replace(day=1) if months else d, months)
    start = _unit_start(d, zone)
    if start <= u:
        # The clock went back across midnight, so ``u`` reads the previous date but the new
        # day has begun. America/Goose_Bay, 1990-10-28: at 00:01 -03:00 clocks go back to
        # 23:01 -04:00 on the 27th. The 28th starts at its first midnight (03:00Z); the
        # repeated 23:01-23:59 belong to it, making it 25 hours, and no date is split in two.
        d = _step(d, months)
        start = _unit_start(d, zone)
    return d, start


def _starts_day(t: datetime, zone: tzinfo) -> bool:
    return t.astimezone(zone).date() > (t - _TICK).astimezone(zone).date()


# Hours are found in absolute time: a bucket starts at each instant whose wall clock reads
# a whole hour, and at each day start (so every day is a union of hours). Two such instants
# under one offset are one hour apart; only an offset change needs a closer look.
#   New York 2024-11-03: 01:00-04:00 (05:00Z) and 01:00-05:00 (06:00Z) both read 01:00,
#     so the repeated hour is two buckets with distinct offsets; the day has 25 of them.
#   New York 2024-03-10: 01:59:59-05:00 is followed by 03:00-04:00 (07:00Z); no instant
#     reads 02:00, so there is no 02:00 bucket and the day has 23.
#   Asia/Kolkata (+05:30): 10:00 local is 04:30Z, so hours start at :30 UTC; Kathmandu
#     (+05:45) at :15. Both are multiples of SLOT_MS.
#   Australia/Lord_Howe moves by 30 minutes. In April 02:00+11:00 becomes 01:30+10:30
#     (15:00Z) and the next whole hour is 02:00+10:30 (15:30Z); in October 02:00+10:30
#     becomes 02:30+11:00 and the next is 03:00+11:00. Either way 01:00 lasts 90 minutes.
#   Asia/Kathmandu, 1986-01-01: 00:00+05:30 became 00:15+05:45 (18:30Z). That instant
#     starts a day, so it ends the 23:00 hour and starts a 45-minute 00:15 bucket.
def _hour_next(u: datetime, zone: tzinfo) -> datetime:
    while True:
        w = u.astimezone(zone)
        off = w.utcoffset()
        cand = u + (_HOUR - _into_hour(w))
        if cand.astimezone(zone).utcoffset() == off:
            return cand
        t = _transition(u, cand, zone)
        if not _into_hour(t.astimezone(zone)) or _starts_day(t, zone):
            return t
        u = t  # not a boundary: carry on under the new offset


def _hour_floor(u: datetime, zone: tzinfo) -> datetime:
    while True:
        w = u.astimezone(zone)
        cand = u - _into_hour(w)
        if cand.astimezone(zone).utcoffset() == w.utcoffset():
            return cand
        # The offset changed inside this wall hour, at an instant not on the hour.
        t = _transition(cand, u, zone)
        if _starts_day(t, zone):
            return t
        u = t - _TICK


class Granularity(StrEnum):
    """Bucket size. Each member knows how to align and step in a zone."""

    HOUR = "hour"
    DAY = "day"
    MONTH = "month"
    TOTAL = "total"

    def floor(self, t: datetime) -> datetime:
        """Start of the bucket containing aware ``t``, aligned in and expressed in t's zone."""
        zone, u = _split(t, self)
        if self is Granularity.HOUR:
            return _hour_floor(u, zone).astimezone(zone)
        months = self is Granularity.MONTH
        d = _day_next(u, zone, months)[0]
        return _unit_start(_step(d, months, -1), zone).astimezone(zone)

    def next_start(self, t: datetime) -> datetime:
        """Start of the bucket after the one containing aware ``t``, in t's zone."""
        zone, u = _split(t, self)
        if self is Granularity.HOUR:
            return _hour_next(u, zone).astimezone(zone)
        return _day_next(u, zone, self is Granularity.MONTH)[1].astimezone(zone)


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket ``[start, end)``, both ends aware and expressed in the query zone."""

    start: datetime
    end: datetime

    @property
    def start_ms(self) -> int:
        return to_ms(self.start)

    @property
    def end_ms(self) -> int:
        return to_ms(self.end)


def buckets(
    start: datetime, end: datetime, granularity: Granularity, zone: ZoneInfo
) -> list[Bucket]:
    """Partition ``[start, end)`` into buckets aligned in ``zone``, first and last clipped.

    Consecutive buckets share their boundary; ``TOTAL`` gives one bucket and an empty or
    inverted range gives none. Datetimes are expressed in ``zone``.
    """
    return [Bucket(a, b) for a, b in pairwise(bucket_edges(start, end, granularity, zone)[0])]


def bucket_edges(
    start: datetime, end: datetime, granularity: Granularity, zone: ZoneInfo
) -> tuple[list[datetime], list[int]]:
    """The boundaries of ``buckets(start, end, granularity, zone)``: the first bucket's start
    and then every bucket's end, expressed in ``zone``, and the same instants as epoch
    milliseconds (``to_ms``). Both empty when the range is. The engine reads a report's
    buckets so, without a Bucket per bucket or a conversion per boundary: a 90-day hourly
    report has 2,161 boundaries."""
    _aware(start, "start")
    _aware(end, "end")
    s, e = start.astimezone(_UTC), end.astimezone(_UTC)
    if s >= e:
        return [], []
    cuts = [s.astimezone(zone)]
    edges = [to_ms(s)]
    if granularity is Granularity.HOUR:
        u = _hour_next(s, zone)
        w = u.astimezone(zone)
        while u < e:
            # Fast path. Offsets change at most once a week in tzdata (the closest pair:
            # Brazil, 2000-10-08 and 10-15), so if the wall clock moves by exactly a day over
            # the next day of time, nothing changes inside it and its whole hours follow by
            # wall-clock addition, which is what ``+`` does within one tzinfo. Not from a
            # repeated reading (fold=1): after a 2-hour fall back the next one repeats too.
            # The day's hours (up to the range's end) are then made by C loops: the wall
            # times by accumulate, their milliseconds by a range, no statement per hour.
            if not (w.fold or _into_hour(w)) and (u + _DAY).astimezone(zone) - w == _DAY:
                n = min(24, -((u - e) // _HOUR))  # the hours that start before the end
                cuts += accumulate(repeat(_HOUR, n - 1), add, initial=w)
                ms = to_ms(u)
                edges += range(ms, ms + n * _HOUR_MS, _HOUR_MS)
                u += _HOUR * n
                w += _HOUR * n
            else:
                cuts.append(w)
                edges.append(to_ms(u))
                u = _hour_next(u, zone)
                w = u.astimezone(zone)
    elif granularity is not Granularity.TOTAL:
        months = granularity is Granularity.MONTH
        u = _day_next(s, zone, months)[1]
        w = u.astimezone(zone)
        while u < e:
            cuts.append(w)
            edges.append(to_ms(u))
            # Derive the date from the start itself: Pacific/Apia skipped 2011-12-30, and
            # the jump that starts that "day" already reads 2011-12-31 00:00.
            d = w.date().replace(day=1) if months else w.date()
            nd = _step(d, months)
            span = nd - d
            nxt = u + span
            nw = nxt.astimezone(zone)
            if nw - w != span or w.hour or w.minute or w.second or w.microsecond:
                nxt = _unit_start(nd, zone)  # offset changed, or this unit began at a jump
                nw = nxt.astimezone(zone)
            u, w = nxt, nw
    cuts.append(e.astimezone(zone))
    edges.append(to_ms(e))
    return cuts, edges


_ZONE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+)*")


def parse_zone(name: str) -> ZoneInfo:
    """The IANA zone called ``name``; ValueError naming it if unknown or malformed."""
    if not name:
        raise ValueError(f"time zone is empty: {_ZONE_EXAMPLE}")
    # Vet the shape first: ZoneInfo keys are file paths under the tz database, and dots,
    # leading slashes and the like would reach files that are not zones ("../etc").
    if _ZONE_NAME.fullmatch(name):
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass  # not found, a directory ("America"), or a data file that is not a zone
    raise ValueError(f"unknown time zone {name!r}: {_ZONE_EXAMPLE}")


def to_ms(t: datetime) -> int:
    """Epoch milliseconds of aware ``t`` (floored, exact integer arithmetic)."""
    _aware(t, "t")
    return (t - _EPOCH) // _MS


def from_ms(ms: int, zone: ZoneInfo = UTC) -> datetime:
    """The instant ``ms`` epoch milliseconds, expressed in ``zone``."""
    try:
        return (_EPOCH + timedelta(milliseconds=ms)).astimezone(zone)
    except OverflowError as exc:
        raise ValueError(f"epoch milliseconds {ms} are out of range") from exc


# re.ASCII: \d would also take other scripts' digits ("٣"), which int() then reads.
_EPOCH_MS = re.compile(r"-?\d{1,16}", re.ASCII)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_DATE_TIME = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?)([Zz]|[+-]\d{2}:?\d{2})?",
    re.ASCII,
)

# The instants a query range may reach. Python's datetime stops at years 1 and 9999, and
# bucketing steps a unit past each end in the query's zone (up to 14 hours of offset), so
# ranges near either limit overflowed; usage itself is recorded from 2000 to 2199.
EARLIEST_QUERY = datetime(1970, 1, 1, tzinfo=_UTC)
LATEST_QUERY = datetime(2200, 1, 1, tzinfo=_UTC)


def out_of_range(t: datetime) -> str | None:
    """Why ``t`` cannot bound a query range, or None when it can."""
    if EARLIEST_QUERY <= t <= LATEST_QUERY:
        return None
    return (
        f"{isoformat(t)} is outside the supported range,"
        f" {isoformat(EARLIEST_QUERY)} to {isoformat(LATEST_QUERY)}"
    )


def parse_instant(text: str, default_zone: ZoneInfo = UTC) -> datetime:
    """Parse an instant: RFC 3339 date-time, naive date-time, date, or epoch milliseconds.

    Without an offset a date-time is wall time in ``default_zone``: a repeated time is its
    first occurrence, a skipped one reads with the earlier offset (New York 2024-03-10T02:30
    is 03:30-04:00). A date is the start of that local day (its midnight, or the jump where
    midnight is skipped). Digits alone are epoch milliseconds. The result is in the offset
    given, else in ``default_zone``.
    """
    s = text.strip()
    try:
        if _EPOCH_MS.fullmatch(s):
            return from_ms(int(s), default_zone)
        if _DATE.fullmatch(s):
            return _unit_start(date.fromisoformat(s), default_zone).astimezone(default_zone)
        m = _DATE_TIME.fullmatch(s)
        if m:
            t = datetime.fromisoformat(f"{m[1]}T{m[2]}{(m[3] or '').upper()}")
            if t.tzinfo is None:
                # Round trip through UTC so a skipped wall time comes back as a real one.
                return t.replace(tzinfo=default_zone).astimezone(_UTC).astimezone(default_zone)
            return t
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"invalid instant {text!r}: {exc}") from exc
    raise ValueError(
        f"invalid instant {text!r}: expected an RFC 3339 date-time such as"
        " '2024-01-02T03:04:05Z', a date such as '2024-01-02', or epoch milliseconds"
    )


def isoformat(t: datetime) -> str:
    """ISO 8601 with the offset at that instant, 'Z' for zero; milliseconds only if nonzero."""
    if t.tzinfo is None:
        raise ValueError(f"t must be timezone-aware, got naive {t.isoformat()}")
    # datetime.isoformat writes the offset itself, seconds included where a zone's LMT has
    # them (+00:19:32); it is one C call, and a report formats two of these per bucket.
    text = t.isoformat("T", "seconds" if t.microsecond == 0 else "milliseconds")
    if text.endswith("+00:00"):
        return text[:-6] + "Z"  # as RFC 3339 and Go's time.RFC3339 do for any zero offset
    return text


def add_months(d: date, months: int) -> date:
    """``d`` moved by calendar months, the day clamped: 2024-01-31 + 1 is 2024-02-29."""
    y, m = divmod(d.year * 12 + d.month - 1 + months, 12)
    return date(y, m + 1, min(d.day, calendar.monthrange(y, m + 1)[1]))


def add_years(d: date, years: int) -> date:
    """``d`` moved by whole years; Feb 29 becomes Feb 28 in a common year."""
    return add_months(d, 12 * years)


_PRESETS: dict[str, Callable[[date], date]] = {
    "7-days": lambda today: today - timedelta(days=7),
    "30-days": lambda today: today - timedelta(days=30),
    "3-months": lambda today: add_months(today, -3),
}


def preset_range(name: str, today: date) -> tuple[date, date]:
    """``(first day, today)`` for a named preset: '7-days', '30-days' or '3-months'."""
    try:
        return _PRESETS[name](today), today
    except KeyError:
        known = ", ".join(repr(k) for k in _PRESETS)
        raise ValueError(f"unknown preset {name!r}: expected one of {known}") from None


@dataclass(frozen=True, slots=True)
class BillingCycle:
    """Billing cycles anchored on a date, repeating monthly or yearly."""

    anchor: date
    period: str = "month"

    def __post_init__(self) -> None:
        if self.period not in ("month", "year"):
            raise ValueError(f"billing period must be 'month' or 'year', got {self.period!r}")
        if isinstance(self.anchor, datetime):
            raise ValueError("billing anchor must be a date, not a datetime")

    def containing(self, day: date) -> tuple[date, date]:
        """``[cycle start, next cycle start)`` containing ``day``, before the anchor too.

        Cycle k starts at anchor + k periods, counted from the anchor: with anchor 2024-01-31
        the starts are 02-29, 03-31, 04-30; stepping from the last start would stick at 29.
        """
        step = 1 if self.period == "month" else 12
        months = (day.year - self.anchor.year) * 12 + day.month - self.anchor.month
        k = months // step  # the cycle starting in day's month (or year), or the one before
        start = add_months(self.anchor, k * step)
        if start > day:
            k -= 1
            start = add_months(self.anchor, k * step)
        return start, add_months(self.anchor, (k + 1) * step)
