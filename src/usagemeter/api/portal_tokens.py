"""Portal tokens over HTTP (operator): issue one for an account's customer, revoke it.
What a token is and may do: portal.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import msgspec
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from usagemeter.api.responses import ApiError, JSONResponse
from usagemeter.api.services import services
from usagemeter.api.tenants import _not_found, body_doc, decode, operator, small_body
from usagemeter.model import PortalToken
from usagemeter.portal import DEFAULT_TTL, issue_token
from usagemeter.store.base import NotFound
from usagemeter.timewindows import isoformat

router = APIRouter()
MAX_METRICS = 100


class PortalTokenIn(msgspec.Struct, forbid_unknown_fields=True):
    expires_in: int = int(DEFAULT_TTL.total_seconds())  # seconds
    metrics: list[str] | None = None  # None: every metric


def token_json(token: PortalToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "account_id": token.account_id,
        "metrics": sorted(token.metrics) if token.metrics is not None else None,
        "created_at": isoformat(token.created_at),
        "expires_at": isoformat(token.expires_at),
        "revoked_at": isoformat(token.revoked_at) if token.revoked_at else None,
    }


@router.post(
    "/v1/accounts/{account_id}/portal-tokens",
    status_code=201,
    tags=["portal tokens"],
    openapi_extra=body_doc(PortalTokenIn, {"expires_in": 3600, "metrics": ["requests"]}),
)
async def create_portal_token(request: Request, account_id: str) -> JSONResponse:
    """A short-lived, read-only token for one account's customer (operator key): it reads
    that account (and its subaccounts) like the account's read key, only ``metrics`` when
    given, for ``expires_in`` seconds (default 3600, at most 7 days). ``token`` is the secret,
    shown here once; ``dashboard_url`` opens the dashboard on the account with it."""
    operator(request)
    data: PortalTokenIn = decode(PortalTokenIn, await small_body(request))
    if data.metrics is not None and not (0 < len(data.metrics) <= MAX_METRICS):
        raise ApiError(400, "invalid_body", f"metrics: 1 to {MAX_METRICS} names, or leave it out")
    svc = services(request)
    try:
        token, secret = await run_in_threadpool(
            lambda: issue_token(
                svc.store,
                account_id,
                now=svc.now(),
                ttl=timedelta(seconds=data.expires_in),
                metrics=data.metrics,
            )
        )
    except NotFound:
        raise _not_found("account", account_id) from None
    except ValueError as exc:
        raise ApiError(400, "invalid_body", str(exc)) from None
    # The secret goes in the fragment, which browsers never send to a server or log.
    url = "/dashboard#" + urlencode({"token": secret, "account": account_id})
    body = {**token_json(token), "token": secret, "dashboard_url": url}
    return JSONResponse(body, status_code=201)


@router.delete("/v1/portal-tokens/{token_id}", tags=["portal tokens"])
def revoke_portal_token(request: Request, token_id: str) -> JSONResponse:
    """Revoke a portal token (operator key): the next request with it is refused, on every
    server sharing the store. Revoking twice is harmless."""
    operator(request)
    try:
        token = services(request).store.revoke_portal_token(token_id)
    except NotFound:
        raise _not_found("portal token", token_id) from None
    return JSONResponse(token_json(token))
