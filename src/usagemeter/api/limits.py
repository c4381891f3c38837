"""Limits, the "may I?" check, webhook endpoints and their deliveries (native API)."""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urlsplit

import msgspec
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from usagemeter.alerts import Alerts
from usagemeter.api.native import caller, refuse_unknown_params
from usagemeter.api.params import ascii_int
from usagemeter.api.responses import ApiError, JSONResponse
from usagemeter.api.services import services
from usagemeter.api.tenants import body_doc, decode, operator, readable_account, small_body
from usagemeter.limitmodel import (
    Action,
    Delivery,
    DeliveryStatus,
    Limit,
    Period,
    ThresholdUnit,
    WebhookEndpoint,
)
from usagemeter.limits import InvalidLimit, build_limit, check, new_limit_id, wall_ms
from usagemeter.store.base import Conflict, NotFound
from usagemeter.timewindows import from_ms, isoformat
from usagemeter.webhooks import new_secret

router = APIRouter()


def _alerts(request: Request) -> Alerts:
    found: Alerts = request.app.state.alerts
    return found


class LimitIn(msgspec.Struct, forbid_unknown_fields=True):
    metric: str
    amount: float
    period: str = Period.BILLING_CYCLE.value
    tz: str = "UTC"
    include_subaccounts: bool = True
    thresholds: list[float] = msgspec.field(default_factory=lambda: [100.0])
    threshold_unit: str = ThresholdUnit.PERCENT.value
    action: str = Action.ALERT.value


class LimitPatch(msgspec.Struct, forbid_unknown_fields=True):
    amount: float | None = None
    period: str | None = None
    tz: str | None = None
    include_subaccounts: bool | None = None
    thresholds: list[float] | None = None
    threshold_unit: str | None = None
    action: str | None = None


def _build(limit_id: str, account_id: str, data: LimitIn, created_ms: int) -> Limit:
    """The limit the body describes, or a 400 listing everything wrong with it."""
    try:
        return build_limit(
            limit_id,
            account_id,
            metric=data.metric,
            amount=data.amount,
            period=data.period,
            tz=data.tz,
            include_subaccounts=data.include_subaccounts,
            thresholds=data.thresholds,
            threshold_unit=data.threshold_unit,
            action=data.action,
            created_ms=created_ms,
        )
    except InvalidLimit as exc:
        raise ApiError(400, "invalid_limit", str(exc), {"errors": exc.errors}) from None


def limit_json(limit: Limit) -> dict[str, Any]:
    return {
        "id": limit.id,
        "account": limit.account_id,
        "metric": limit.metric,
        "amount": limit.amount,
        "period": limit.period.value,
        "tz": limit.tz,
        "include_subaccounts": limit.include_subaccounts,
        "thresholds": list(limit.thresholds),
        "threshold_unit": limit.threshold_unit.value,
        "action": limit.action.value,
        "created_at": isoformat(from_ms(limit.created_at_ms)),
    }


def _operator_account(request: Request, account_id: str) -> None:
    """Pass for an operator key and an existing account."""
    key = operator(request)
    readable_account(request, key, account_id)


def _limit(request: Request, account_id: str, metric: str) -> Limit:
    try:
        return services(request).store.get_limit(account_id, metric)
    except NotFound:
        message = f"account {account_id!r} has no limit on {metric!r}"
        raise ApiError(404, "not_found", message) from None


LIMIT_EXAMPLE = {"metric": "lookups", "amount": 10000, "thresholds": [50, 80, 100]}


@router.post(
    "/v1/accounts/{account_id}/limits",
    status_code=201,
    tags=["limits"],
    openapi_extra=body_doc(LimitIn, LIMIT_EXAMPLE),
)
async def create_limit(request: Request, account_id: str) -> JSONResponse:
    """Limit an account's usage of a metric per period (operator). ``thresholds`` are
    percents of ``amount`` (or usage values, with ``threshold_unit: absolute``); each one
    reached fires a ``usage.threshold_crossed`` webhook once per period."""
    _operator_account(request, account_id)
    data: LimitIn = decode(LimitIn, await small_body(request))
    limit = _build(new_limit_id(), account_id, data, wall_ms())
    try:
        await run_in_threadpool(services(request).store.create_limit, limit)
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    _alerts(request).refresh()
    return JSONResponse(limit_json(limit), status_code=201)


@router.get("/v1/accounts/{account_id}/limits", tags=["limits"])
async def list_limits(request: Request, account_id: str) -> JSONResponse:
    """The account's limits, each with its usage this period (any key that reads it)."""
    readable_account(request, caller(request), account_id)
    svc = services(request)
    data = [
        {**limit_json(limit), "check": check(svc.engine, svc.store, limit, svc.now()).as_dict()}
        for limit in svc.store.list_limits(account_id)
    ]
    return JSONResponse({"data": data})


@router.get("/v1/accounts/{account_id}/limits/{metric}", tags=["limits"])
async def check_limit(request: Request, account_id: str, metric: str) -> JSONResponse:
    """May the account use more of ``metric``? ``used``, ``amount``, ``remaining`` and
    ``exceeded`` for the current period, counting every event acknowledged so far."""
    readable_account(request, caller(request), account_id)  # else the 404 of a missing one
    refuse_unknown_params(request, frozenset())
    svc = services(request)
    limit = _limit(request, account_id, metric)
    return JSONResponse(check(svc.engine, svc.store, limit, svc.now()).as_dict())


@router.patch(
    "/v1/accounts/{account_id}/limits/{metric}",
    tags=["limits"],
    openapi_extra=body_doc(LimitPatch, {"amount": 20000}),
)
async def update_limit(request: Request, account_id: str, metric: str) -> JSONResponse:
    """Change a limit (operator): only the fields sent change."""
    _operator_account(request, account_id)
    patch: LimitPatch = decode(LimitPatch, await small_body(request))
    old = _limit(request, account_id, metric)
    merged = LimitIn(
        metric=old.metric,
        amount=old.amount if patch.amount is None else patch.amount,
        period=patch.period or old.period.value,
        tz=patch.tz or old.tz,
        include_subaccounts=(
            old.include_subaccounts
            if patch.include_subaccounts is None
            else patch.include_subaccounts
        ),
        thresholds=list(old.thresholds) if patch.thresholds is None else patch.thresholds,
        threshold_unit=patch.threshold_unit or old.threshold_unit.value,
        action=patch.action or old.action.value,
    )
    limit = _build(old.id, account_id, merged, old.created_at_ms)
    await run_in_threadpool(services(request).store.replace_limit, limit)
    _alerts(request).refresh()
    return JSONResponse(limit_json(limit))


@router.delete("/v1/accounts/{account_id}/limits/{metric}", tags=["limits"])
def delete_limit(request: Request, account_id: str, metric: str) -> JSONResponse:
    """Remove a limit (operator). Its recorded crossings and deliveries stay listed."""
    _operator_account(request, account_id)
    old = _limit(request, account_id, metric)
    services(request).store.delete_limit(account_id, metric)
    _alerts(request).refresh()
    return JSONResponse({**limit_json(old), "deleted": True})


# ------------------------------------------------------------------ webhooks


class WebhookIn(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    account: str | None = None


def webhook_json(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "account": endpoint.account_id,
        "created_at": isoformat(from_ms(endpoint.created_at_ms)),
    }


def delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "event_id": delivery.crossing_id,
        "webhook": delivery.endpoint_id,
        "account": delivery.account_id,
        "status": delivery.status.value,
        "attempts": delivery.attempts,
        "next_attempt_at": (
            isoformat(from_ms(delivery.next_at_ms)) if delivery.status == "pending" else None
        ),
        "last_error": delivery.last_error,
        "delivered_at": (
            isoformat(from_ms(delivery.delivered_at_ms)) if delivery.delivered_at_ms else None
        ),
        "created_at": isoformat(from_ms(delivery.created_at_ms)),
        "payload": msgspec.json.decode(delivery.payload),
    }


@router.post(
    "/v1/webhooks",
    status_code=201,
    tags=["webhooks"],
    openapi_extra=body_doc(WebhookIn, {"url": "https://example.com/hooks/usage"}),
)
async def create_webhook(request: Request) -> JSONResponse:
    """Send threshold alerts to ``url`` (operator): one account's, or every account's when
    ``account`` is left out. The answer's ``secret`` signs every delivery (Standard Webhooks:
    ``webhook-signature``); it is shown here once."""
    key = operator(request)
    data: WebhookIn = decode(WebhookIn, await small_body(request))
    parts = urlsplit(data.url)
    # Spaces and control characters are never part of a URL (RFC 3986): percent-encode them.
    unsafe = any(c <= " " or c == "\x7f" for c in data.url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or len(data.url) > 2000
        or unsafe
    ):
        message = (
            "url: an http:// or https:// URL with a host, at most 2000 characters, with"
            " spaces and control characters percent-encoded"
        )
        raise ApiError(400, "invalid_webhook", message)
    if data.account is not None:
        try:
            readable_account(request, key, data.account)
        except ApiError:
            message = f"account: account {data.account!r} does not exist"
            raise ApiError(400, "invalid_webhook", message) from None
    endpoint = WebhookEndpoint(
        "wh_" + secrets.token_hex(8), data.url, data.account, new_secret(), wall_ms()
    )
    await run_in_threadpool(services(request).store.create_webhook, endpoint)
    return JSONResponse({**webhook_json(endpoint), "secret": endpoint.secret}, status_code=201)


@router.get("/v1/webhooks", tags=["webhooks"])
def list_webhooks(request: Request) -> JSONResponse:
    """The webhook endpoints, without their secrets (operator)."""
    operator(request)
    endpoints = services(request).store.list_webhooks()
    return JSONResponse({"data": [webhook_json(e) for e in endpoints]})


DELIVERY_PAGE = 100  # deliveries per page unless ``limit`` says otherwise
MAX_DELIVERY_PAGE = 1000


@router.get("/v1/webhooks/deliveries", tags=["webhooks"])
def list_deliveries(
    request: Request,
    account: str | None = None,
    status: str | None = None,
    limit: str | None = None,
    after: str | None = None,
) -> JSONResponse:
    """Deliveries of the alerts, oldest first, with their status and attempts (operator):
    ``account`` narrows to one account's, ``status`` (pending, delivered, failed) to one
    status; a page holds ``limit`` (default 100, at most 1000), and ``next`` names the
    ``after`` that asks for the following page (null on the last)."""
    operator(request)
    refuse_unknown_params(request, frozenset({"account", "status", "limit", "after"}))
    store = services(request).store
    errors = []
    wanted = None
    if status is not None:
        try:
            wanted = DeliveryStatus(status)
        except ValueError:
            choices = ", ".join(s.value for s in DeliveryStatus)
            errors.append({"param": "status", "message": f"one of {choices}, not {status!r}"})
    size = DELIVERY_PAGE if limit is None else ascii_int(limit)
    if size is None or not 1 <= size <= MAX_DELIVERY_PAGE:
        errors.append(
            {"param": "limit", "message": f"a whole number from 1 to {MAX_DELIVERY_PAGE}"}
        )
    if after is not None:
        try:
            store.get_delivery(after)
        except NotFound:
            errors.append({"param": "after", "message": f"no delivery {after!r}"})
    if errors:
        message = "; ".join(f"{e['param']}: {e['message']}" for e in errors)
        raise ApiError(400, "invalid_query", message, {"errors": errors})
    assert size is not None
    page = store.list_deliveries(account, status=wanted, after=after, limit=size + 1)
    more = len(page) > size
    page = page[:size]
    return JSONResponse(
        {
            "data": [delivery_json(d) for d in page],
            "next": page[-1].id if more else None,
        }
    )


@router.post("/v1/webhooks/deliveries/{delivery_id}/replay", tags=["webhooks"])
def replay_delivery(request: Request, delivery_id: str) -> JSONResponse:
    """Send a delivery again, now, whatever its status (operator)."""
    operator(request)
    try:
        delivery = services(request).store.replay_delivery(delivery_id, wall_ms())
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    _alerts(request).dispatcher.wake()
    return JSONResponse(delivery_json(delivery))


@router.delete("/v1/webhooks/{webhook_id}", tags=["webhooks"])
def delete_webhook(request: Request, webhook_id: str) -> JSONResponse:
    """Stop sending to an endpoint (operator); its pending deliveries fail."""
    operator(request)
    try:
        services(request).store.delete_webhook(webhook_id)
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return JSONResponse({"id": webhook_id, "deleted": True})
