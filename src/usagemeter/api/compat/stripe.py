"""Stripe's billing meter events under ``/stripe``: the ``stripe`` Python client, with
``stripe.api_base = "http://host:port/stripe"`` and a usagemeter key as its secret key, sends
``MeterEvent.create(...)`` here.

``POST /v1/billing/meter_events`` takes Stripe's form-encoded fields: ``event_name`` is the
metric, ``payload[stripe_customer_id]`` the account, ``payload[value]`` the value (a number,
as text), ``identifier`` the id (a retried identifier is acknowledged again and counted
once; without one, the request's ``Idempotency-Key``, which the client keeps across its own
retries), ``timestamp`` Unix seconds (default now). Any other ``payload[...]`` key becomes a
dimension. The answer is a ``billing.meter_event`` object; errors are Stripe's
``{"error": {"type", "message", "param", "code"}}``.

The v2 stream (``POST /v2/billing/meter_event_stream``, JSON, up to 100 events, RFC 3339
timestamps) maps its events the same way. Stripe validates a stream's events
asynchronously, after accepting the request; here a bad event rejects the whole request at
once, naming it, and nothing of the request is stored.

The key goes as ``Authorization: Bearer <key>``, as the client sends it, or as HTTP basic
auth with the key as the user name, as Stripe also accepts.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from starlette.responses import Response

from usagemeter.api.compat.common import (
    as_number,
    body_doc,
    decode_json,
    in_peer_terms,
    map_events,
    read_body,
    store_mapped,
    unix_seconds,
)
from usagemeter.api.credentials import bearer_secret
from usagemeter.api.responses import JSONResponse
from usagemeter.api.services import services
from usagemeter.auth import authenticate
from usagemeter.ingest import BatchRejected
from usagemeter.model import ApiKey
from usagemeter.timewindows import isoformat, to_ms

router = APIRouter(prefix="/stripe", tags=["stripe"])

CUSTOMER = "payload[stripe_customer_id]"
VALUE = "payload[value]"
PEER_NAMES = {
    "id": "identifier",
    "account": CUSTOMER,
    "metric": "event_name",
    "ts": "timestamp",
    "value": VALUE,
    "dimensions": "payload",
}


class StripeError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        error: dict[str, Any] = {"type": "invalid_request_error", "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.code is not None:
            error["code"] = self.code
        return JSONResponse({"error": error}, status_code=self.status)


def basic_secret(request: Request) -> str | None:
    """The user name of ``Authorization: Basic``, where Stripe's clients may put the key."""
    scheme, _, encoded = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user or None


def _caller(request: Request) -> ApiKey:
    secret = bearer_secret(request) or basic_secret(request)
    key = authenticate(services(request).store, secret)
    if key is None:
        # Never echo the key back, not even masked: the message says what to send instead.
        raise StripeError(401, "Invalid API Key provided: send a usagemeter key as the secret key")
    return key


def _fields(body: bytes) -> tuple[dict[str, str], dict[str, str]]:
    """The form's top-level fields and its ``payload[...]`` entries."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise StripeError(400, "the body must be form-encoded (key=value&...)") from None
    fields: dict[str, str] = {}
    payload: dict[str, str] = {}
    for name, value in pairs:
        if name.startswith("payload[") and name.endswith("]"):
            key = name[len("payload[") : -1]
            if not key or "[" in key or "]" in key:
                raise StripeError(400, f"{name}: payload keys are flat names", name)
            payload[key] = value
        else:
            fields[name] = value
    return fields, payload


def _to_native(
    event_name: object, identifier: str, payload: dict[str, str], ts: object
) -> dict[str, Any]:
    """One meter event -> a native raw event; ``ts`` is epoch ms or RFC 3339 text."""
    if not isinstance(event_name, str) or not event_name:
        raise ValueError("event_name: Missing required param: event_name.")
    if not payload.get("stripe_customer_id"):
        raise ValueError(f"{CUSTOMER}: Missing required param: {CUSTOMER}.")
    value = as_number(payload.get("value"))
    if value is None:
        raise ValueError(f"{VALUE}: required, a number such as 25")
    return {
        "id": identifier,
        "account": payload["stripe_customer_id"],
        "metric": event_name,
        "ts": ts,
        "value": value,
        "dimensions": {
            k: v for k, v in payload.items() if k not in ("stripe_customer_id", "value")
        },
    }


def _v1_timestamp(fields: dict[str, str], now_s: int) -> int:
    timestamp = fields.get("timestamp")
    if timestamp is None:
        return now_s * 1000
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise ValueError("timestamp: whole Unix seconds, e.g. 1735689600")
    return unix_seconds(timestamp, "timestamp")


def _rejected(exc: BatchRejected, where: str = "") -> StripeError:
    """The first bad event's problem as Stripe's error: its param, and the message."""
    error = in_peer_terms(exc.errors[0], PEER_NAMES)
    message = error.message
    if error.field is not None and message.startswith(error.field + ":"):
        message = message[len(error.field) + 1 :].strip()
    param = error.field
    if where:
        param = f"events[{error.index}].{param}" if param else f"events[{error.index}]"
        message = f"events[{error.index}]: {message}"
    return StripeError(400, message, param, "parameter_invalid")


@router.post(
    "/v1/billing/meter_events",
    openapi_extra=body_doc(
        "application/x-www-form-urlencoded",
        "event_name=api_requests&payload[stripe_customer_id]=acme&payload[value]=25"
        "&identifier=req-1&timestamp=1736935200",
    ),
)
async def create_meter_event(request: Request) -> Response:
    """One meter event; answered with the ``billing.meter_event`` once it is on disk."""
    try:
        key = _caller(request)
        body = await read_body(request, StripeError(413, "the request body is too large"))
        fields, payload = _fields(body)
        if not fields.get("identifier"):
            # The client sends one Idempotency-Key per create call, the same on each of its
            # retries: it names an event sent without an identifier, so a retry of a request
            # whose answer was lost is counted once. Without either, the event is new.
            retry_key = request.headers.get("idempotency-key")
            fields["identifier"] = f"idem_{retry_key}" if retry_key else f"mev_{uuid.uuid4().hex}"
        now_s = int(services(request).now().timestamp())
        mapped = map_events(
            [None],
            lambda _, __: _to_native(
                fields.get("event_name"),
                fields["identifier"],
                payload,
                _v1_timestamp(fields, now_s),
            ),
        )
        try:
            await store_mapped(request, mapped, key)
        except BatchRejected as exc:
            raise _rejected(exc) from None
    except StripeError as error:
        return error.response()
    native = mapped[0]
    assert isinstance(native, dict)
    return JSONResponse(
        {
            "object": "billing.meter_event",
            "created": now_s,
            "event_name": native["metric"],
            "identifier": native["id"],
            "livemode": False,
            "payload": payload,
            "timestamp": native["ts"] // 1000,
        }
    )


# ------------------------------------------------------- the v2 meter event stream

MAX_STREAM = 100  # events per request, as Stripe's stream


@router.post("/v2/billing/meter_event_session")
async def create_session(request: Request) -> Response:
    """A session for the stream. Its token is the key the session was asked with: the
    stream authenticates as that key, for as long as the key lives."""
    try:
        _caller(request)
    except StripeError as error:
        return error.response()
    secret = bearer_secret(request) or basic_secret(request)
    now = services(request).now()
    return JSONResponse(
        {
            "id": f"mes_{uuid.uuid4().hex}",
            "object": "v2.billing.meter_event_session",
            "authentication_token": secret,
            "created": isoformat(now),
            "expires_at": isoformat(now + timedelta(minutes=15)),
            "livemode": False,
        }
    )


def _stream_event(event: object, index: int, retry_key: str | None, now_ms: int) -> dict[str, Any]:
    if not isinstance(event, dict):
        raise ValueError("expected a meter event object")
    payload = event.get("payload")
    if not isinstance(payload, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in payload.items()
    ):
        raise ValueError("payload: an object of strings")
    identifier = event.get("identifier")
    if identifier is None:
        # As in v1: the request's Idempotency-Key, kept across the client's retries, names
        # each event sent without an identifier by its place in the request.
        identifier = f"idem_{retry_key}_{index}" if retry_key else f"mev_{uuid.uuid4().hex}"
    if not isinstance(identifier, str):
        raise ValueError("identifier: a string")
    timestamp = event.get("timestamp")
    if timestamp is not None and not isinstance(timestamp, str):
        raise ValueError("timestamp: RFC 3339 text, e.g. 2025-01-15T10:00:00Z")
    return _to_native(event.get("event_name"), identifier, payload, timestamp or now_ms)


@router.post(
    "/v2/billing/meter_event_stream",
    openapi_extra=body_doc(
        "application/json",
        {
            "events": [
                {
                    "event_name": "api_requests",
                    "identifier": "req-1",
                    "timestamp": "2025-01-15T10:00:00Z",
                    "payload": {"stripe_customer_id": "acme", "value": "25"},
                }
            ]
        },
    ),
)
async def create_stream_events(request: Request) -> Response:
    """Up to 100 meter events, stored whole or not at all: where Stripe reports a bad event
    later, asynchronously, this rejects the request at once, naming the event."""
    try:
        key = _caller(request)
        body = await read_body(request, StripeError(413, "the request body is too large"))
        try:
            decoded = decode_json(body)
        except ValueError as exc:
            raise StripeError(400, f'the body must be JSON, {{"events": [...]}}: {exc}') from None
        events = decoded.get("events") if isinstance(decoded, dict) else None
        if not isinstance(events, list) or not 0 < len(events) <= MAX_STREAM:
            raise StripeError(400, f"events: a list of 1 to {MAX_STREAM} meter events", "events")
        retry_key = request.headers.get("idempotency-key")
        now_ms = to_ms(services(request).now())
        mapped = map_events(events, lambda e, i: _stream_event(e, i, retry_key, now_ms))
        try:
            await store_mapped(request, mapped, key)
        except BatchRejected as exc:
            raise _rejected(exc, "events") from None
    except StripeError as error:
        return error.response()
    return JSONResponse({})
