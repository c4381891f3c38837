"""Stripe's billing meter events under ``/stripe``: the ``stripe`` Python client, with
``stripe.api_base = "http://host:port/stripe"`` and a usagemeter key as its secret key, sends
``MeterEvent.create(...)`` here.

``POST /v1/billing/meter_events`` takes Stripe's form-encoded fields: ``event_name`` is the
metric, ``payload[stripe_customer_id]`` the account, ``payload[value]`` the value (a number,
as text), ``identifier`` the id (a retried identifier is acknowledged again and counted
once; without one, the request's ``Idempotency-Key``, which the client keeps across its own
retries), ``timestamp`` Unix seconds (default now). Any
other ``payload[...]`` key becomes a dimension. The answer is a ``billing.meter_event``
object; errors are Stripe's ``{"error": {"type", "message", "param", "code"}}``. Stripe takes
one event per request here, so there is no batch to reject.

The key goes as ``Authorization: Bearer <key>``, as the client sends it, or as HTTP basic
auth with the key as the user name, as Stripe also accepts.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from starlette.responses import Response

from usagemeter.api.compat.common import (
    as_number,
    body_doc,
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


def _to_native(fields: dict[str, str], payload: dict[str, str], now_s: int) -> dict[str, Any]:
    if not fields.get("event_name"):
        raise ValueError("event_name: Missing required param: event_name.")
    if not payload.get("stripe_customer_id"):
        raise ValueError(f"{CUSTOMER}: Missing required param: {CUSTOMER}.")
    value = as_number(payload.get("value"))
    if value is None:
        raise ValueError(f"{VALUE}: required, a number such as 25")
    timestamp = fields.get("timestamp")
    if timestamp is not None and not (timestamp.isascii() and timestamp.isdigit()):
        raise ValueError("timestamp: whole Unix seconds, e.g. 1735689600")
    return {
        "id": fields["identifier"],
        "account": payload["stripe_customer_id"],
        "metric": fields["event_name"],
        "ts": now_s * 1000 if timestamp is None else unix_seconds(timestamp, "timestamp"),
        "value": value,
        "dimensions": {
            k: v for k, v in payload.items() if k not in ("stripe_customer_id", "value")
        },
    }


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
        body = await read_body(request)
        if body is None:
            raise StripeError(413, "the request body is too large")
        fields, payload = _fields(body)
        if not fields.get("identifier"):
            # The client sends one Idempotency-Key per create call, the same on each of its
            # retries: it names an event sent without an identifier, so a retry of a request
            # whose answer was lost is counted once. Without either, the event is new.
            retry_key = request.headers.get("idempotency-key")
            fields["identifier"] = f"idem_{retry_key}" if retry_key else f"mev_{uuid.uuid4().hex}"
        now_s = int(services(request).now().timestamp())
        mapped = map_events([None], lambda _: _to_native(fields, payload, now_s))
        try:
            await store_mapped(request, mapped, key)
        except BatchRejected as exc:
            error = in_peer_terms(exc.errors[0], PEER_NAMES)
            message = error.message
            if error.field is not None and message.startswith(error.field + ":"):
                message = message[len(error.field) + 1 :].strip()
            raise StripeError(400, message, error.field, "parameter_invalid") from None
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
