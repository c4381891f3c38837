"""Plain typed values of limits and alerts: a limit, a webhook endpoint, a threshold crossing
and one delivery of it. The store keeps them; limits.py and webhooks.py give them behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Period(StrEnum):
    """The stretch of time a limit's usage is counted over, the one containing "now"."""

    BILLING_CYCLE = "billing_cycle"  # from the account's anchor (calendar months without one)
    DAY = "day"
    MONTH = "month"
    TOTAL = "total"  # all time


class Action(StrEnum):
    ALERT = "alert"  # tell the webhooks; usage goes on
    BLOCK = "block"  # the same, and the check tells the provider to refuse (429)


class ThresholdUnit(StrEnum):
    PERCENT = "percent"  # thresholds are shares of the amount: [50, 80, 100]
    ABSOLUTE = "absolute"  # thresholds are usage values: [5000, 9000]


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``amount`` of ``metric`` per period for an account (and, by default, its
    subaccounts), measured in ``tz``. One limit per account and metric."""

    id: str
    account_id: str
    metric: str
    amount: float
    period: Period = Period.BILLING_CYCLE
    tz: str = "UTC"
    include_subaccounts: bool = True
    thresholds: tuple[float, ...] = (100.0,)
    threshold_unit: ThresholdUnit = ThresholdUnit.PERCENT
    action: Action = Action.ALERT
    created_at_ms: int = 0

    def threshold_values(self) -> tuple[tuple[float, float], ...]:
        """Each threshold as given and as the usage value that crosses it."""
        if self.threshold_unit is ThresholdUnit.ABSOLUTE:
            return tuple((t, t) for t in self.thresholds)
        return tuple((t, self.amount * t / 100) for t in self.thresholds)


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """Where alerts go: every account's (``account_id`` None) or one account's. ``secret``
    signs each delivery; it is a signing key kept to sign with, never a credential."""

    id: str
    url: str
    account_id: str | None
    secret: str
    created_at_ms: int


@dataclass(frozen=True, slots=True)
class Crossing:
    """One threshold of one limit crossed in one period: recorded once, ever. ``threshold``
    is the usage value crossed; ``payload`` the webhook body (JSON text), fixed when the
    crossing is recorded."""

    id: str
    limit_id: str
    account_id: str
    period_start_ms: int
    threshold: float
    payload: str
    created_at_ms: int


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for its first or next attempt
    DELIVERED = "delivered"  # the endpoint answered 2xx
    FAILED = "failed"  # retried for the whole retry window in vain (replayable)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One crossing sent to one endpoint, with its attempts so far."""

    id: str
    crossing_id: str
    endpoint_id: str
    account_id: str
    status: DeliveryStatus
    attempts: int
    next_at_ms: int
    created_at_ms: int
    last_error: str | None = None
    delivered_at_ms: int | None = None
    payload: str = ""
