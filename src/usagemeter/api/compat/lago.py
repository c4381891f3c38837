"""Lago's events API under ``/lago``: the ``lago-python-client``, given
``Client(api_key=..., api_url="http://host:port/lago/")`` (the trailing slash matters: the
client joins ``api/v1/`` onto it), sends its usage here.

An event maps onto a native one: ``transaction_id`` is its id (a retried transaction is
acknowledged again and counted once), ``external_subscription_id`` (or
``external_customer_id``) the account, ``code`` the metric, ``timestamp`` (Unix seconds,
default now) its time. The value is the property named by the metric's ``field_name`` in the
meters file (a count needs none); the other scalar properties become dimensions, and nested
ones are not kept.

A batch (``POST /api/v1/events/batch``, up to 100 events) is stored whole or not at all: one
bad event rejects it with a 422 naming every bad event by index, as Lago rejects a batch.
Errors use Lago's envelope: ``{"status", "error", "code", "error_details"}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from usagemeter.api.compat.common import (
    as_number,
    body_doc,
    decode_json,
    in_peer_terms,
    map_events,
    read_body,
    scalar_text,
    store_mapped,
    unix_seconds,
)
from usagemeter.api.credentials import key_from_bearer
from usagemeter.api.responses import JSONResponse
from usagemeter.api.services import services
from usagemeter.ingest import BatchRejected, EventError
from usagemeter.model import Aggregation, ApiKey
from usagemeter.timewindows import from_ms, isoformat, to_ms

router = APIRouter(prefix="/lago", tags=["lago"])

MAX_BATCH = 100  # as Lago's batch endpoint
PEER_NAMES = {
    "id": "transaction_id",
    "account": "external_subscription_id",
    "metric": "code",
    "ts": "timestamp",
    "value": "properties",
    "dimensions": "properties",
}
ERRORS = {
    400: "Bad Request",
    401: "Unauthorized",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
}


class LagoError(Exception):
    def __init__(self, status: int, code: str | None = None, details: Any = None) -> None:
        super().__init__(code)
        self.status, self.code, self.details = status, code, details

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"status": self.status, "error": ERRORS.get(self.status, "Error")}
        if self.code is not None:
            body["code"] = self.code
        if self.details is not None:
            body["error_details"] = self.details
        return JSONResponse(body, status_code=self.status)


def _caller(request: Request) -> ApiKey:
    key = key_from_bearer(services(request).store, request)
    if key is None:
        raise LagoError(401)
    return key


def _to_native(event: object, value_fields: dict[str, str], now_ms: int) -> dict[str, Any]:
    if not isinstance(event, dict):
        raise ValueError("expected an event object")
    for name in ("transaction_id", "code"):
        if not isinstance(event.get(name), str) or not event[name]:
            raise ValueError(f"{name}: value_is_mandatory: a non-empty string")
    account = event.get("external_subscription_id") or event.get("external_customer_id")
    if not isinstance(account, str):
        raise ValueError(
            "external_subscription_id: value_is_mandatory: the subscription (or"
            " external_customer_id) the usage belongs to"
        )
    properties = event.get("properties") or {}
    if not isinstance(properties, dict):
        raise ValueError("properties: expected an object")
    # The property that holds the value; a unique count's field is a dimension instead.
    field_name = value_fields.get(event["code"])
    value: float | None = 1
    if field_name is not None:
        value = as_number(properties.get(field_name))
        if value is None:
            raise ValueError(
                f"properties: {field_name!r} must hold a number: the value of {event['code']!r}"
            )
    dimensions = {}
    for name, raw in properties.items():
        text = scalar_text(raw)
        if text is not None and name != field_name:
            dimensions[name] = text
    timestamp = event.get("timestamp")  # Unix seconds, fractions allowed; default now
    return {
        "id": event["transaction_id"],
        "account": account,
        "metric": event["code"],
        "ts": now_ms if timestamp is None else unix_seconds(timestamp, "timestamp"),
        "value": value,
        "dimensions": dimensions,
    }


def _echo(event: dict[str, Any], native: dict[str, Any], created_at: str) -> dict[str, Any]:
    """An event as Lago answers it."""
    return {
        "lago_id": None,
        "transaction_id": native["id"],
        "lago_customer_id": None,
        "lago_subscription_id": None,
        "external_subscription_id": native["account"],
        "external_customer_id": event.get("external_customer_id"),
        "code": native["metric"],
        "timestamp": isoformat(from_ms(native["ts"])),
        "properties": event.get("properties") or {},
        "precise_total_amount_cents": event.get("precise_total_amount_cents"),
        "created_at": created_at,
    }


async def _ingest(request: Request, root: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """The request's events (under ``root``), stored; each with its native mapping."""
    key = _caller(request)
    body = await read_body(request, LagoError(413))
    try:
        decoded = decode_json(body)
    except ValueError as exc:
        raise LagoError(400, "invalid_json", {"body": [str(exc)]}) from None
    events = decoded.get(root) if isinstance(decoded, dict) else None
    if root == "events":
        if not isinstance(events, list):
            raise LagoError(422, "validation_errors", {"events": ["expected a list of events"]})
        if len(events) > MAX_BATCH:
            raise LagoError(422, "validation_errors", {"events": ["too_many_events"]})
    else:
        events = [events]
    svc = services(request)
    now_ms = to_ms(svc.now())
    meters = svc.engine.meters
    value_fields = {
        metric: name
        for metric, name in meters.peers.field_names.items()
        if meters.get(metric).aggregation is not Aggregation.UNIQUE_COUNT
    }
    mapped = map_events(events, lambda e, _: _to_native(e, value_fields, now_ms))
    try:
        await store_mapped(request, mapped, key)
    except BatchRejected as exc:
        raise LagoError(422, "validation_errors", _details(exc.errors, root == "events")) from None
    return events, [m for m in mapped if isinstance(m, dict)]


def _details(errors: list[EventError], batch: bool) -> dict[str, Any]:
    """Lago's error_details: field -> messages; in a batch, keyed by the event's index."""
    details: dict[str, Any] = {}
    for error in errors:
        error = in_peer_terms(error, PEER_NAMES)
        fields = details.setdefault(str(error.index), {}) if batch else details
        field = error.field or "event"
        head, colon, rest = error.message.partition(":")
        message = rest.strip() if colon and head == field else error.message
        fields.setdefault(field, []).append(message)
    return details


EVENT_EXAMPLE = {
    "transaction_id": "tx-1",
    "external_subscription_id": "acme",
    "code": "storage",
    "timestamp": 1736935200,
    "properties": {"gb": 1.5, "region": "eu"},
}


@router.post("/api/v1/events", openapi_extra=body_doc("application/json", {"event": EVENT_EXAMPLE}))
async def create_event(request: Request) -> Response:
    """One event: ``{"event": {...}}``; answered with the event, once it is on disk."""
    try:
        events, natives = await _ingest(request, "event")
    except LagoError as error:
        return error.response()
    created = isoformat(services(request).now())
    return JSONResponse({"event": _echo(events[0], natives[0], created)})


@router.post(
    "/api/v1/events/batch",
    openapi_extra=body_doc("application/json", {"events": [EVENT_EXAMPLE]}),
)
async def create_batch(request: Request) -> Response:
    """Up to 100 events: ``{"events": [...]}``, stored whole or not at all."""
    try:
        events, natives = await _ingest(request, "events")
    except LagoError as error:
        return error.response()
    created = isoformat(services(request).now())
    return JSONResponse(
        {"events": [_echo(e, n, created) for e, n in zip(events, natives, strict=True)]}
    )
