"""What the peers' APIs share: reading a body, storing mapped events through the native
ingest, and peer payload values as dimensions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from usagemeter.api.services import services
from usagemeter.ingest import MAX_TS_MS, MIN_TS_MS, BatchRejected, EventError
from usagemeter.model import ApiKey, AppendResult

MAX_BODY = 16 * 1024 * 1024  # as the native POST /v1/events


def body_doc(content_type: str, example: object) -> dict[str, Any]:
    """The request body of a route that reads it raw, for the OpenAPI document."""
    return {"requestBody": {"required": True, "content": {content_type: {"example": example}}}}


# A peer event is mapped to a native raw event (a dict that ingest validates), or to the
# error that stopped its mapping.
Mapped = dict[str, Any] | EventError


async def read_body(request: Request, too_large: Exception) -> bytes:
    """The body; ``too_large`` (in the peer's error shape) when it is larger than any batch
    needs."""
    body = await request.body()
    if len(body) > MAX_BODY:
        raise too_large
    return body


def decode_json(text: bytes | str) -> object:
    """Any JSON value; ValueError saying what is wrong when the text is not JSON, or nests
    so deep that decoding it would exhaust the stack (msgspec raises RecursionError there)."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError("not valid JSON: nested too deep") from None


def scalar_text(value: object) -> str | None:
    """A payload value as a dimension value: text as it is, numbers and booleans as JSON
    writes them; None for what is not a scalar (an object, a list, null)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value
    return None


def as_number(value: object) -> float | None:
    """A finite number, or its text ("12.5": the peers' payloads carry numbers as text
    too); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def unix_seconds(raw: object, field: str) -> int:
    """Unix seconds (a number or its text; Lago's and Stripe's timestamps) -> epoch ms,
    within the years ingest takes."""
    seconds = as_number(raw)
    if seconds is None or not MIN_TS_MS <= seconds * 1000 < MAX_TS_MS:
        raise ValueError(f"{field}: Unix seconds from 2000 to 2199, e.g. 1735689600")
    return round(seconds * 1000)


def _store(request: Request, mapped: Sequence[Mapped], caller: ApiKey) -> AppendResult:
    """Validate every mapped event as the native API does (tenancy, accounts, keys, bounds),
    then store the batch whole or not at all. BatchRejected lists the peer's mapping errors
    and the native ones together, by each event's index in the peer's batch."""
    ingestor = services(request).ingestor
    positions = [i for i, item in enumerate(mapped) if not isinstance(item, EventError)]
    raws = [mapped[i] for i in positions]
    errors = [item for item in mapped if isinstance(item, EventError)]
    try:
        if not errors:
            # The native ingest's own path: validate, then append (and what it keeps track
            # of when a write fails).
            return ingestor.ingest(raws, caller)
        ingestor.validate(raws, caller)  # only to name the other bad events too
    except BatchRejected as exc:
        errors += [
            replace(e, index=positions[e.index] if e.index < len(positions) else e.index)
            for e in exc.errors
        ]
    raise BatchRejected(sorted(errors, key=lambda e: e.index))


def map_events(
    items: Sequence[object], to_native: Callable[[object, int], dict[str, Any]]
) -> list[Mapped]:
    """Each peer event mapped (with its index) to a native raw event, or to the error
    (``field: message``) that stopped it, so a batch's reply names every bad event at once."""
    mapped: list[Mapped] = []
    for index, item in enumerate(items):
        try:
            mapped.append(to_native(item, index))
        except ValueError as exc:
            message = str(exc)
            field = message.split(":", 1)[0] if ":" in message else None
            mapped.append(EventError(index, field, message))
    return mapped


def in_peer_terms(error: EventError, names: dict[str, str]) -> EventError:
    """A native error about ``account``, ``metric``, ... told with the peer's field names:
    an OpenMeter user sent a ``subject``, not an ``account``."""
    native = error.field or error.message.split(":", 1)[0].split(".", 1)[0]
    peer = names.get(native)
    if peer is None:
        return error
    message = error.message
    if message.startswith(native):
        message = peer + message[len(native) :]
    return replace(error, field=peer, message=message)


async def store_mapped(request: Request, mapped: Sequence[Mapped], caller: ApiKey) -> AppendResult:
    """``_store`` in the thread pool: it waits for the commit's fsync."""
    return await run_in_threadpool(_store, request, mapped, caller)
