"""The storage protocol's part for limits and alerts (store/limitstore.py implements it in
SQL every store shares)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from usagemeter.limitmodel import Crossing, Delivery, DeliveryStatus, Limit, WebhookEndpoint


class LimitStore(Protocol):
    """What every store keeps for limits and alerts."""

    def create_limit(self, limit: Limit) -> Limit:
        """Conflict if the account already has a limit on the metric."""
        ...

    def get_limit(self, account_id: str, metric: str) -> Limit: ...
    def list_limits(self, account_id: str | None = None) -> list[Limit]:
        """One account's limits, or every account's (None)."""
        ...

    def replace_limit(self, limit: Limit) -> Limit: ...
    def delete_limit(self, account_id: str, metric: str) -> None: ...
    def alert_cursor(self) -> int | None:
        """The event log's arrival number the alerts have evaluated up to (None: never)."""
        ...

    def advance_alert_cursor(self, seq: int) -> None:
        """Move the cursor to ``seq``, never back (processes may race)."""
        ...

    def create_webhook(self, endpoint: WebhookEndpoint) -> WebhookEndpoint: ...
    def list_webhooks(self) -> list[WebhookEndpoint]: ...
    def delete_webhook(self, endpoint_id: str) -> None: ...
    def record_crossing(self, crossing: Crossing, deliveries: Sequence[Delivery]) -> bool:
        """Store a crossing and its deliveries in one transaction; False (and nothing
        stored) if the limit's threshold was already crossed in that period."""
        ...

    def due_deliveries(self, now_ms: int, limit: int = 100) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, the oldest first."""
        ...

    def claim_delivery(self, delivery: Delivery, until_ms: int) -> bool:
        """Push a due delivery's next attempt to ``until_ms`` unless another worker did
        first: True means this worker attempts it now."""
        ...

    def finish_attempt(
        self,
        delivery_id: str,
        status: DeliveryStatus,
        next_at_ms: int,
        error: str | None,
        delivered_at_ms: int | None,
    ) -> None:
        """Record one attempt's outcome (attempts + 1)."""
        ...

    def list_deliveries(
        self,
        account_id: str | None = None,
        *,
        status: DeliveryStatus | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[Delivery]:
        """Deliveries oldest first: one account's or all, of one status or any, those after
        the delivery ``after`` names, at most ``limit``."""
        ...

    def get_delivery(self, delivery_id: str) -> Delivery: ...
    def replay_delivery(self, delivery_id: str, now_ms: int) -> Delivery:
        """Make a delivery pending and due now, whatever its status."""
        ...
