"""The questions every system answers, and what counts as the same answer."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from bench import generate as g

# How each metric aggregates by default in our service (DESIGN.md, "Default meters"); the
# peers compute the same. Lookups are compared as billable events only (seed 001).
DEFAULT_AGGREGATION = {
    "actions": "count",
    "lookups": "count",
    "requests": "count",
    "conversations": "count",
    "ApiCalls": "sum",
    "Events": "sum",
    "BotAnalyses": "sum",
    "Sessions": "unique_count",
    "StorageBytes": "latest",
}
UNIQUE_DIMENSION = {"Sessions": "session_id"}
BILLABLE_ONLY = {"lookups"}
TAGS_ALL_OF = ("prod", "web")


@dataclass(frozen=True)
class Question:
    """One query: [start, end) in UTC, buckets aligned in `tz`."""

    name: str
    label: str  # which account: "heavy" or "typical"
    account: str
    metric: str
    start: dt.datetime
    end: dt.datetime
    granularity: str  # "day" or "hour"
    tz: str
    aggregation: str  # count, sum, unique_count or latest
    key: str | None = None
    tags: tuple[str, ...] = ()
    billable: bool | None = None
    group_by: str | None = None
    explicit_aggregation: bool = True  # False: rely on the metric's default meter

    @property
    def unique_dimension(self) -> str | None:
        return UNIQUE_DIMENSION.get(self.metric) if self.aggregation == "unique_count" else None

    @property
    def start_ms(self) -> int:
        return int(self.start.timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        return int(self.end.timestamp() * 1000)


def local_midnight(day: dt.date, tz: str) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz)).astimezone(dt.UTC)


def days_back(anchor: dt.date, days: int, tz: str) -> tuple[dt.datetime, dt.datetime]:
    """The `days` whole local days before the anchor date, as a UTC half-open range."""
    return local_midnight(anchor - dt.timedelta(days=days), tz), local_midnight(anchor, tz)


def headline(anchor: dt.date, account: int = 0, label: str = "heavy") -> Question:
    """The heavy-account 90-day daily report: billable lookups per New York day."""
    start, end = days_back(anchor, 90, "America/New_York")
    return Question(
        name="90d daily, account, New York: lookups",
        label=label,
        account=g.account_id(account),
        metric="lookups",
        start=start,
        end=end,
        granularity="day",
        tz="America/New_York",
        aggregation="count",
        billable=True,
    )


def question_set(anchor: dt.date, account: int, label: str) -> list[Question]:
    """The issue's questions for one account (its heaviest key where a key is asked for)."""
    acct, key = g.account_id(account), g.key_id(account, 0)
    utc90 = days_back(anchor, 90, "UTC")
    ny90 = days_back(anchor, 90, "America/New_York")
    kol7 = days_back(anchor, 7, "Asia/Kolkata")
    out = [
        Question(
            name="90d daily, key, UTC: lookups",
            label=label,
            account=acct,
            metric="lookups",
            start=utc90[0],
            end=utc90[1],
            granularity="day",
            tz="UTC",
            aggregation="count",
            key=key,
            billable=True,
        )
    ]
    for metric in g.METRICS:
        agg = DEFAULT_AGGREGATION[metric]
        out.append(
            Question(
                name=f"90d daily, account, New York: {metric}",
                label=label,
                account=acct,
                metric=metric,
                start=ny90[0],
                end=ny90[1],
                granularity="day",
                tz="America/New_York",
                aggregation=agg,
                billable=True if metric in BILLABLE_ONLY else None,
                explicit_aggregation=agg in ("count", "sum"),
            )
        )
    out.append(
        Question(
            name="7d hourly, account, Kolkata: requests by status",
            label=label,
            account=acct,
            metric="requests",
            start=kol7[0],
            end=kol7[1],
            granularity="hour",
            tz="Asia/Kolkata",
            aggregation="count",
            group_by="status",
        )
    )
    out.append(
        Question(
            name=f"90d daily, key, tags {'+'.join(TAGS_ALL_OF)}: lookups",
            label=label,
            account=acct,
            metric="lookups",
            start=utc90[0],
            end=utc90[1],
            granularity="day",
            tz="UTC",
            aggregation="count",
            key=key,
            tags=TAGS_ALL_OF,
            billable=True,
        )
    )
    return out


Group = tuple[tuple[str, str], ...]


@dataclass
class Answer:
    """A system's answer, normalised: zero cells dropped, bucket starts as UTC epoch ms."""

    buckets: dict[tuple[int, Group], float] = field(default_factory=dict)
    totals: dict[Group, float] = field(default_factory=dict)
    total: float = 0.0

    def add_bucket(self, start_ms: int, group: Group, value: float | None) -> None:
        if value:
            self.buckets[(start_ms, group)] = float(value)

    def add_total(self, group: Group, value: float | None) -> None:
        if value:
            self.totals[group] = float(value)


def group_of(question: Question, value: str | None) -> Group:
    return ((question.group_by, value),) if question.group_by and value is not None else ()


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def differences(ours: Answer, theirs: Answer, limit: int = 5) -> list[str]:
    """What differs between two answers (empty when they agree), at most `limit` lines."""
    out = []
    for cell in sorted(set(ours.buckets) | set(theirs.buckets)):
        a, b = ours.buckets.get(cell, 0.0), theirs.buckets.get(cell, 0.0)
        if not _close(a, b):
            when = dt.datetime.fromtimestamp(cell[0] / 1000, dt.UTC).isoformat()
            out.append(f"bucket {when} {dict(cell[1])}: ours {a:g}, theirs {b:g}")
    for group in sorted(set(ours.totals) | set(theirs.totals)):
        a, b = ours.totals.get(group, 0.0), theirs.totals.get(group, 0.0)
        if not _close(a, b):
            out.append(f"total {dict(group)}: ours {a:g}, theirs {b:g}")
    if not _close(ours.total, theirs.total):
        out.append(f"grand total: ours {ours.total:g}, theirs {theirs.total:g}")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])
