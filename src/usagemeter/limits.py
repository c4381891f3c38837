"""Limits: the period a limit counts over, its usage as the engine reports it, the "may I?"
check, and the threshold crossings a period's usage has reached.

A limit means exactly what a report says: its usage is ``Engine.run`` for the metric over the
period, in the limit's zone, over the account (and its subaccounts unless told otherwise),
with the metric's meter. Nothing here counts events itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum

from usagemeter.engine import Engine
from usagemeter.limitmodel import (
    Action,
    Crossing,
    Delivery,
    DeliveryStatus,
    Limit,
    Period,
    ThresholdUnit,
)
from usagemeter.model import Account
from usagemeter.model import Query as UsageQuery
from usagemeter.store.base import Store
from usagemeter.timewindows import (
    EARLIEST_QUERY,
    LATEST_QUERY,
    BillingCycle,
    Granularity,
    isoformat,
    parse_zone,
    to_ms,
)

MAX_AMOUNT = 1e15  # as an event's value
MAX_THRESHOLDS = 20
MAX_METRIC = 200
CALENDAR_MONTH = BillingCycle(datetime(2000, 1, 1).date(), "month")  # cycles without an anchor


class InvalidLimit(ValueError):
    """Everything wrong with a limit's description, each naming its field."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def new_limit_id() -> str:
    return "lim_" + secrets.token_hex(8)


def _choices(enum: type[StrEnum]) -> str:
    return ", ".join(repr(m.value) for m in enum)


def _number_errors(name: str, value: float) -> list[str]:
    if not math.isfinite(value) or value <= 0 or value > MAX_AMOUNT:
        return [f"{name}: a number above 0 and at most 1e15"]
    return []


def build_limit(
    limit_id: str,
    account_id: str,
    *,
    metric: str,
    amount: float,
    period: str = Period.BILLING_CYCLE.value,
    tz: str = "UTC",
    include_subaccounts: bool = True,
    thresholds: Sequence[float] = (100.0,),
    threshold_unit: str = ThresholdUnit.PERCENT.value,
    action: str = Action.ALERT.value,
    created_ms: int = 0,
) -> Limit:
    """A limit from its description's plain values, or InvalidLimit naming every fault."""
    errors: list[str] = []
    if not metric.strip() or len(metric) > MAX_METRIC:
        errors.append(f"metric: 1 to {MAX_METRIC} characters")
    errors += _number_errors("amount", amount)
    if period not in set(Period):
        errors.append(f"period: one of {_choices(Period)}")
    if threshold_unit not in set(ThresholdUnit):
        errors.append(f"threshold_unit: one of {_choices(ThresholdUnit)}")
    if action not in set(Action):
        errors.append(f"action: one of {_choices(Action)}")
    try:
        parse_zone(tz)
    except ValueError as exc:
        errors.append(f"tz: {exc}")
    if not 1 <= len(thresholds) <= MAX_THRESHOLDS:
        errors.append(f"thresholds: 1 to {MAX_THRESHOLDS} of them, e.g. [50, 80, 100]")
    for i, threshold in enumerate(thresholds):
        errors += _number_errors(f"thresholds[{i}]", threshold)
    if errors:
        raise InvalidLimit(errors)
    return Limit(
        id=limit_id,
        account_id=account_id,
        metric=metric,
        amount=amount,
        period=Period(period),
        tz=tz,
        include_subaccounts=include_subaccounts,
        thresholds=tuple(sorted(set(thresholds))),
        threshold_unit=ThresholdUnit(threshold_unit),
        action=Action(action),
        created_at_ms=created_ms,
    )


def period_at(limit: Limit, account: Account, at: datetime) -> tuple[datetime, datetime]:
    """``[start, end)`` of the limit's period containing ``at``, in the limit's zone.

    A billing cycle runs from the anchor's day at 00:00 in the zone: with anchor 2024-01-31
    in America/New_York, the cycle of 2025-03-15 is [2025-02-28 05:00Z, 2025-03-31 04:00Z),
    one hour short of 31 days (the DST change of March 9), as the engine's own days are.
    """
    zone = parse_zone(limit.tz)
    local = at.astimezone(zone)
    if limit.period is Period.DAY:
        return Granularity.DAY.floor(local), Granularity.DAY.next_start(local)
    if limit.period is Period.MONTH:
        return Granularity.MONTH.floor(local), Granularity.MONTH.next_start(local)
    if limit.period is Period.TOTAL:
        return EARLIEST_QUERY.astimezone(zone), LATEST_QUERY.astimezone(zone)
    first, following = (account.billing_cycle or CALENDAR_MONTH).containing(local.date())
    return _day_start(first, local), _day_start(following, local)


def _day_start(day: date, like: datetime) -> datetime:
    """00:00 of ``day`` in ``like``'s zone, as the engine aligns days (a zone whose midnight
    is skipped starts the day at the first instant it has)."""
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=like.tzinfo)
    return Granularity.DAY.floor(noon)


@dataclass(frozen=True, slots=True)
class Check:
    """A limit's standing in one period."""

    limit: Limit
    used: float
    period_start: datetime
    period_end: datetime

    @property
    def remaining(self) -> float:
        return max(self.limit.amount - self.used, 0.0)

    @property
    def exceeded(self) -> bool:
        return self.used >= self.limit.amount

    def as_dict(self) -> dict[str, object]:
        return {
            "account": self.limit.account_id,
            "metric": self.limit.metric,
            "used": self.used,
            "amount": self.limit.amount,
            "remaining": self.remaining,
            "period": self.limit.period.value,
            "period_start": isoformat(self.period_start),
            "period_end": isoformat(self.period_end),
            "exceeded": self.exceeded,
            "action": self.limit.action.value,
        }


def used(engine: Engine, store: Store, limit: Limit, start: datetime, end: datetime) -> float:
    """The engine's total for the limit's metric over ``[start, end)``."""
    accounts = (
        tuple(store.descendants(limit.account_id))
        if limit.include_subaccounts
        else (limit.account_id,)
    )
    query = UsageQuery(
        accounts=accounts,
        metric=limit.metric,
        start=start,
        end=end,
        granularity=Granularity.TOTAL,
        tz=limit.tz,
    )
    return engine.run(query).total[0]


def check(engine: Engine, store: Store, limit: Limit, at: datetime) -> Check:
    """The limit's usage in the period containing ``at``."""
    start, end = period_at(limit, store.get_account(limit.account_id), at)
    return Check(limit, used(engine, store, limit, start, end), start, end)


def _ident(prefix: str, *parts: object) -> str:
    text = "|".join(str(p) for p in parts)
    return prefix + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def wall_ms() -> int:
    """Real time, for retry schedules (the app's clock may be pinned, the network's is not)."""
    return int(time.time() * 1000)


def record_crossings(
    engine: Engine, store: Store, limit: Limit, at: datetime, now: datetime
) -> list[Crossing]:
    """Record every threshold the usage of the period containing ``at`` has reached and that
    was not recorded before (with a delivery per webhook endpoint that wants the account's
    alerts). The store's key makes a threshold fire once per period, whichever process or
    restart evaluates it. ``now`` is when the crossing is noticed (``occurred_at``)."""
    state = check(engine, store, limit, at)
    endpoints = [e for e in store.list_webhooks() if e.account_id in (None, limit.account_id)]
    fired = []
    period_ms = to_ms(state.period_start)
    for threshold, value in limit.threshold_values():
        if state.used < value:
            continue
        # Keyed by the usage value, not the threshold as given: a limit raised from 10 to 20
        # fires its 100% again when usage reaches 20.
        crossing_id = _ident("thr_", limit.id, period_ms, value)
        body = {
            "type": "usage.threshold_crossed",
            "id": crossing_id,
            "account": limit.account_id,
            "metric": limit.metric,
            "threshold": threshold,
            "threshold_unit": limit.threshold_unit.value,
            "threshold_value": value,
            "used": state.used,
            "amount": limit.amount,
            "action": limit.action.value,
            "period_start": isoformat(state.period_start),
            "period_end": isoformat(state.period_end),
            "occurred_at": isoformat(now),
        }
        created = wall_ms()
        crossing = Crossing(
            crossing_id,
            limit.id,
            limit.account_id,
            period_ms,
            value,
            json.dumps(body, separators=(",", ":")),
            created,
        )
        deliveries = [
            Delivery(
                _ident("dlv_", crossing_id, e.id),
                crossing_id,
                e.id,
                limit.account_id,
                DeliveryStatus.PENDING,
                0,
                created,
                created,
            )
            for e in endpoints
        ]
        if store.record_crossing(crossing, deliveries):
            fired.append(crossing)
    return fired


def periods_touched(limit: Limit, account: Account, timestamps: Sequence[int]) -> list[datetime]:
    """One instant in each of the limit's periods that holds one of ``timestamps`` (epoch
    ms): a late event is evaluated in its own period, not in today's. Sorted, a batch's
    timestamps cost one comparison each, and a period computation per period they span."""
    zone = parse_zone(limit.tz)
    found: list[datetime] = []
    start_ms = end_ms = 0
    for ts in sorted(timestamps):
        if start_ms <= ts < end_ms:
            continue
        at = datetime.fromtimestamp(ts / 1000, zone)
        start, end = period_at(limit, account, at)
        start_ms, end_ms = to_ms(start), to_ms(end)
        found.append(at)
    return found


def previous_instant(limit: Limit, account: Account, at: datetime) -> datetime:
    """An instant in the period before the one containing ``at``."""
    start, _ = period_at(limit, account, at)
    return start - timedelta(milliseconds=1)
