"""Webhook deliveries: signing (the Standard Webhooks conventions) and the worker that sends
due deliveries, retrying with exponential backoff.

A delivery is a row in the store, so a restart resumes every pending one, and several
processes on one PostgreSQL database share the work: a worker claims a delivery (pushes its
next attempt past the request's timeout) before it sends it, and only one claim succeeds.
Delivery is at least once: a crash after the receiver answered but before the outcome is
stored sends it again, with the same ``webhook-id`` for the receiver to drop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import httpx

from usagemeter.limitmodel import Delivery, DeliveryStatus, WebhookEndpoint
from usagemeter.limits import wall_ms
from usagemeter.store.base import Store

log = logging.getLogger("usagemeter")
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes one: ``whsec_`` and base64 of the key."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` and the base64 HMAC-SHA256, keyed with the
    secret's decoded bytes, of ``{id}.{timestamp}.{body}``."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempt n+1 waits ``first_s * 2**(n-1)`` after attempt n (at most ``max_s``), until
    ``window_s`` after the crossing; then the delivery fails (and may be replayed)."""

    first_s: float = 5.0
    max_s: float = 3600.0
    window_s: float = 24 * 3600.0
    timeout_s: float = 10.0  # one attempt's HTTP timeout

    def delay_ms(self, attempts: int) -> int:
        return int(min(self.first_s * 2 ** max(attempts - 1, 0), self.max_s) * 1000)


class Dispatcher:
    """A thread that sends due deliveries. ``wake()`` makes it look at once."""

    def __init__(self, store: Store, policy: RetryPolicy, poll_s: float = 1.0) -> None:
        self.store = store
        self.policy = policy
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: httpx.Client | None = None

    def start(self) -> None:
        self._stop.clear()  # an app's lifespan may run more than once (tests do)
        self._client = httpx.Client(timeout=self.policy.timeout_s, follow_redirects=False)
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_due()
            except Exception:
                log.exception("webhook worker: a round failed; trying again")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def send_due(self) -> int:
        """Attempt every due delivery once; how many were attempted."""
        attempted = 0
        endpoints = {e.id: e for e in self.store.list_webhooks()}
        for delivery in self.store.due_deliveries(wall_ms()):
            lease = wall_ms() + int(self.policy.timeout_s * 1000) + 5000
            if self._stop.is_set() or not self.store.claim_delivery(delivery, lease):
                continue
            self._attempt(delivery, endpoints.get(delivery.endpoint_id))
            attempted += 1
        return attempted

    def _attempt(self, delivery: Delivery, endpoint: WebhookEndpoint | None) -> None:
        if endpoint is None:
            self.store.finish_attempt(
                delivery.id, DeliveryStatus.FAILED, wall_ms(), "the endpoint was deleted", None
            )
            return
        body = delivery.payload.encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "usagemeter-webhooks",
            "webhook-id": delivery.crossing_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(endpoint.secret, delivery.crossing_id, timestamp, body),
        }
        error: str | None = None
        assert self._client is not None, "start() first"
        try:
            response = self._client.post(endpoint.url, content=body, headers=headers)
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        now = wall_ms()
        if error is None:
            self.store.finish_attempt(delivery.id, DeliveryStatus.DELIVERED, now, None, now)
            return
        attempts = delivery.attempts + 1
        next_at = now + self.policy.delay_ms(attempts)
        status = DeliveryStatus.PENDING
        if next_at - delivery.created_at_ms > self.policy.window_s * 1000:
            status = DeliveryStatus.FAILED
        log.warning(
            "webhook delivery %s, attempt %d: %s (%s)", delivery.id, attempts, error, status
        )
        self.store.finish_attempt(delivery.id, status, next_at, error, None)
