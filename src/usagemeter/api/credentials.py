"""Reading a caller's secret from the header styles the endpoints use, and checking it."""

from __future__ import annotations

from starlette.requests import Request

from usagemeter.auth import authenticate
from usagemeter.model import ApiKey
from usagemeter.store.base import Store


def bearer_secret(request: Request) -> str | None:
    """``Authorization: Bearer <secret>``; the scheme is case-insensitive (RFC 7235)."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, secret = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return secret.strip() or None


def header_secret(request: Request, name: str) -> str | None:
    value = request.headers.get(name)
    return value.strip() if value and value.strip() else None


def key_from_bearer(store: Store, request: Request) -> ApiKey | None:
    return authenticate(store, bearer_secret(request))
