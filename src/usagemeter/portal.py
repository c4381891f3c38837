"""Portal tokens: short-lived, read-only credentials a provider hands to its customer's
browser, so that the dashboard opens on that customer's usage with no key typed.

A token is a read key of one account that expires (an hour by default), may be limited to
some metrics, and can be revoked. It is stored as keys are, only as the SHA-256 of its
secret, in the store's ``portal_tokens`` table: every process on one PostgreSQL sees a
token as soon as it is issued, and a revocation from the next request on, with no cache to
go stale. ``auth.authenticate`` turns a live token into an ``ApiKey`` with the read scope
alone, so every read endpoint takes it as it takes a read key, and every other endpoint
refuses it (no ingest, manage or operator scope).

Two values are per request, in context variables:

- the clock: a token expires by the app's clock (``create_app(now=...)``, which tests pin),
  set for each request by ``AppClock``;
- the metrics the caller may read: set by ``auth.authenticate`` for every caller (None for a
  key), checked by ``Engine.run`` for whatever endpoint asks, so no endpoint can forget it.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta

from starlette.types import ASGIApp, Receive, Scope, Send

from usagemeter.auth import hash_secret
from usagemeter.model import ApiKey, PortalToken
from usagemeter.model import Scope as KeyScope
from usagemeter.store.base import Store
from usagemeter.store.rows import LOOKUP_BYTES

PREFIX = "pt_"
DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=7)  # a portal session, not a standing credential: issue a new one


def _wall_clock() -> datetime:
    return datetime.now(UTC)


_clock: ContextVar[Callable[[], datetime]] = ContextVar("usagemeter_clock", default=_wall_clock)
_readable: ContextVar[frozenset[str] | None] = ContextVar("usagemeter_metrics", default=None)


class MetricNotAllowed(PermissionError):
    """The caller's portal token does not cover this metric (answered with a 403)."""


def issue_token(
    store: Store,
    account_id: str,
    *,
    now: datetime,
    ttl: timedelta = DEFAULT_TTL,
    metrics: Iterable[str] | None = None,
) -> tuple[PortalToken, str]:
    """A new token for ``account_id`` and its secret, which is never stored or shown again.
    ValueError when ``ttl`` is out of bounds; NotFound when the account does not exist."""
    if not timedelta(0) < ttl <= MAX_TTL:
        raise ValueError(f"expires_in: between 1 second and {MAX_TTL.days} days")
    secret = PREFIX + secrets.token_urlsafe(24)
    token = PortalToken(
        id="pt_" + secrets.token_hex(16),
        account_id=account_id,
        metrics=frozenset(metrics) if metrics is not None else None,
        created_at=now,
        expires_at=now + ttl,
    )
    return store.create_portal_token(token, hash_secret(secret)), secret


def authenticate_token(store: Store, secret: str) -> ApiKey | None:
    """The read-only key a live (unexpired, unrevoked) token stands for, or None."""
    if not secret.startswith(PREFIX):
        return None  # not a token: spare the lookup
    digest = hash_secret(secret)
    now = _clock.get()()
    for token, stored in store.find_portal_tokens_by_lookup(digest[:LOOKUP_BYTES]):
        if hmac.compare_digest(digest, stored) and token.revoked_at is None:
            return as_key(token) if now < token.expires_at else None
    return None


def as_key(token: PortalToken) -> ApiKey:
    return ApiKey(
        id=token.id,
        account_id=token.account_id,
        name="portal token",
        prefix=PREFIX,
        scopes=frozenset({KeyScope.READ}),
        created_at=token.created_at,
        metrics=token.metrics,
    )


def restrict_to(key: ApiKey | None) -> None:
    """Remember, for the rest of this request, which metrics its caller may read."""
    _readable.set(key.metrics if key is not None else None)


def may_read(metric: str) -> bool:
    allowed = _readable.get()
    return allowed is None or metric in allowed


def check_metric(metric: str) -> None:
    if not may_read(metric):
        raise MetricNotAllowed(f"this portal token may not read metric {metric!r}")


class AppClock:
    """Pure ASGI middleware: token expiry in this request is judged by the app's clock."""

    def __init__(self, app: ASGIApp, now: Callable[[], datetime]) -> None:
        self.app = app
        self.now = now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _clock.set(self.now)
        await self.app(scope, receive, send)
