"""OpenMeter's API under ``/openmeter``: the ``openmeter`` Python client, given
``Client(endpoint="http://host:port/openmeter", token=...)``, ingests and queries here.

Ingest (``POST /api/v1/events``) takes CloudEvents 1.0, one (``application/cloudevents+json``)
or a batch (``application/cloudevents-batch+json``), or plain JSON of either. An event maps
onto a native one: ``subject`` is the account, ``type`` the metric, ``time`` the timestamp
(default: now), and ``source`` with ``id`` its id, deduplicated as native ids are: a retried
event is counted once, forever. ``data`` gives the value (the ``valueProperty`` of the event
type's meters) and the dimensions (their ``groupBy``), as the meters file declares them.

A bad event rejects the whole batch: nothing of it is stored, and the 400 problem names every
bad event by index. OpenMeter also rejects a batch with a malformed CloudEvent, but takes an
event whose value property is missing and leaves it out of its meters afterwards; here that
event is rejected up front, so nothing acknowledged goes uncounted. (An event without the
property a UNIQUE_COUNT meter counts is taken: it adds no distinct value, as in OpenMeter.)

Meters are declared in the meters file (``slug``, ``eventType``, ``aggregation``,
``valueProperty``, ``groupBy``); ``GET /api/v1/meters`` lists them and
``/api/v1/meters/{slug}/query`` (GET, or POST with a JSON body) answers over the engine,
windows aligned in ``windowTimeZone`` as every native report is. A subject filter is checked
as a native account is (a key reads its own tree); without one, a query covers what the key
may read. Errors are RFC 7807 problems, as OpenMeter's.
"""

from __future__ import annotations

import ast
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from urllib.parse import quote

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
)
from usagemeter.api.credentials import key_from_bearer
from usagemeter.api.responses import JSONResponse, number
from usagemeter.api.services import Services, services
from usagemeter.auth import can_read
from usagemeter.ingest import BatchRejected
from usagemeter.model import GROUP_SUBACCOUNT, ApiKey, Result
from usagemeter.model import Query as UsageQuery
from usagemeter.peer_meters import MISSING, OpenMeterMeter, extract, parse_path
from usagemeter.timewindows import Granularity, isoformat, parse_instant, parse_zone, to_ms

router = APIRouter(prefix="/openmeter", tags=["openmeter"])

MAX_WINDOWS = 10_000
MAX_FILTER = 4096  # characters of filterGroupBy
FROM_DEFAULT = datetime.fromisoformat("2000-01-01T00:00:00+00:00")  # ingest's earliest
WINDOWS = {"HOUR": Granularity.HOUR, "DAY": Granularity.DAY, "MONTH": Granularity.MONTH}
# Native field names in errors, told as a CloudEvent names them.
PEER_NAMES = {"account": "subject", "metric": "type", "ts": "time", "id": "id"}
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
}


class Problem(Exception):
    """An RFC 7807 problem, the error shape of OpenMeter's API and its client."""

    def __init__(self, status: int, detail: str, extensions: dict[str, Any] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.extensions = extensions or {}

    def response(self, request: Request) -> JSONResponse:
        body = {
            "type": "about:blank",
            "title": TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
            "instance": request.url.path,
            **({"extensions": self.extensions} if self.extensions else {}),
        }
        response = JSONResponse(body, status_code=self.status)
        response.headers["content-type"] = "application/problem+json"
        return response


def _caller(request: Request) -> ApiKey:
    key = key_from_bearer(services(request).store, request)
    if key is None:
        raise Problem(401, "send a valid key as 'Authorization: Bearer <secret>'")
    return key


# -------------------------------------------------------------------- ingest


def _native_id(event: dict[str, Any]) -> str:
    # CloudEvents are unique by source and id. The source is percent-encoded, so the first
    # '/' always ends it and no two (source, id) pairs share a native id.
    return f"{quote(str(event['source']), safe='')}/{event['id']}"


def _to_native(event: object, meters: list[OpenMeterMeter], now_ms: int) -> dict[str, Any]:
    """One CloudEvent -> a native raw event; ValueError names the CloudEvent field."""
    if not isinstance(event, dict):
        raise ValueError("expected a CloudEvent object")
    if event.get("specversion") != "1.0":
        raise ValueError("specversion: required, '1.0'")
    for name in ("id", "source", "type", "subject"):
        if not isinstance(event.get(name), str) or not event[name]:
            raise ValueError(f"{name}: required, a non-empty string")
    if event.get("time") is not None and not isinstance(event["time"], str):
        raise ValueError("time: RFC 3339 text, e.g. 2025-01-15T10:00:00Z")
    content_type = event.get("datacontenttype")
    if content_type not in (None, "application/json"):
        raise ValueError("datacontenttype: only application/json data is metered")
    data = event.get("data")
    if data is not None and not isinstance(data, dict):
        raise ValueError("data: expected a JSON object")
    value: float = 1
    dimensions: dict[str, str] = {}
    for meter in meters:
        path = meter.value_path
        found = MISSING if path is None else extract(data, path)
        if meter.dimension is not None:  # UNIQUE_COUNT: the property is counted, not summed
            if found is not MISSING and found is not None:
                text = scalar_text(found)
                if text is None:
                    raise ValueError(f"data: {meter.value_property} must be a string or number")
                dimensions[meter.dimension] = text
        elif path is not None:
            if found is MISSING or found is None:
                raise ValueError(
                    f"data: meter {meter.slug!r} reads {meter.value_property}, which is missing"
                )
            value = _number(found, meter)
        for name, group_path in meter.group_by.items():
            found = extract(data, parse_path(group_path, name))
            if found is MISSING or found is None:
                continue  # OpenMeter groups an event without the property under no value
            text = scalar_text(found)
            if text is None:
                raise ValueError(f"data: {group_path} (groupBy {name}) must be a string or number")
            dimensions[name] = text
    return {
        "id": _native_id(event),
        "account": event["subject"],
        "metric": event["type"],
        "ts": event["time"] if event.get("time") is not None else now_ms,
        "value": value,
        "dimensions": dimensions,
    }


def _number(found: object, meter: OpenMeterMeter) -> float:
    number = as_number(found)  # OpenMeter reads a number given as text too ("12.5")
    if number is None:
        raise ValueError(f"data: {meter.value_property} must be a number (meter {meter.slug!r})")
    return number


def _events(body: bytes, content_type: str) -> list[object]:
    batch = "cloudevents-batch+json" in content_type
    single = "cloudevents+json" in content_type
    if not (batch or single or "application/json" in content_type):
        raise Problem(
            400,
            f"unsupported content type {content_type!r}: send application/cloudevents+json,"
            " application/cloudevents-batch+json or application/json",
        )
    try:
        decoded = decode_json(body)
    except ValueError as exc:
        raise Problem(400, f"request body is {exc}") from None
    if isinstance(decoded, list) and not single:
        return decoded
    if isinstance(decoded, dict) and not batch:
        return [decoded]
    expected = "a JSON array of CloudEvents" if batch else "one CloudEvent object"
    raise Problem(400, f"{content_type}: expected {expected}")


EVENT_EXAMPLE = {
    "specversion": "1.0",
    "id": "evt-1",
    "source": "my-app",
    "type": "prompt",
    "subject": "acme",
    "time": "2025-01-15T10:00:00Z",
    "data": {"tokens": 120, "model": "gpt-4"},
}


@router.post(
    "/api/v1/events",
    status_code=204,
    openapi_extra=body_doc("application/cloudevents-batch+json", [EVENT_EXAMPLE]),
)
async def ingest_events(request: Request) -> Response:
    """Ingest CloudEvents; 204 once the whole batch is on disk."""
    try:
        key = _caller(request)
        body = await read_body(request, Problem(413, "a request body holds at most 16 MiB"))
        events = _events(body, request.headers.get("content-type", "application/json"))
        svc = services(request)
        now_ms = to_ms(svc.now())
        peers = svc.engine.meters.peers

        def to_native(event: object, index: int) -> dict[str, Any]:
            of_type = peers.of_type(str(event.get("type"))) if isinstance(event, dict) else []
            return _to_native(event, of_type, now_ms)

        mapped = map_events(events, to_native)
        try:
            await store_mapped(request, mapped, key)
        except BatchRejected as exc:
            errors = [in_peer_terms(e, PEER_NAMES).as_dict() for e in exc.errors]
            detail = "; ".join(f"event {e['index']}: {e['message']}" for e in errors[:10])
            if len(errors) > 10:
                detail += f" (and {len(errors) - 10} more in extensions.errors)"
            raise Problem(
                400,
                f"{len(errors)} event(s) rejected, nothing stored: {detail}",
                {"errors": errors},
            ) from None
    except Problem as problem:
        return problem.response(request)
    return Response(status_code=204)


# -------------------------------------------------------------------- meters


def _meter(svc: Services, slug: str) -> OpenMeterMeter:
    meter = svc.engine.meters.peers.openmeter.get(slug)
    if meter is None:
        raise Problem(404, f"meter {slug!r} not found; meters are declared in the meters file")
    return meter


@router.get("/api/v1/meters")
async def list_meters(request: Request) -> Response:
    try:
        _caller(request)
    except Problem as problem:
        return problem.response(request)
    peers = services(request).engine.meters.peers
    return JSONResponse([m.as_json() for m in peers.openmeter.values()])


@router.get("/api/v1/meters/{slug}")
async def get_meter(request: Request, slug: str) -> Response:
    try:
        _caller(request)
        return JSONResponse(_meter(services(request), slug).as_json())
    except Problem as problem:
        return problem.response(request)


def _filter_group_by(text: str) -> dict[str, str]:
    # OpenMeter's API takes a JSON object; the Python client sends its dict's repr, so that
    # form (a Python literal, read without evaluating anything) is taken too. Both parsers
    # recurse, so a short bound on the text keeps a deeply nested one from reaching them.
    found: object = None
    if len(text) <= MAX_FILTER:
        try:
            found = decode_json(text)
        except ValueError:
            try:
                found = ast.literal_eval(text)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                found = None
    if not isinstance(found, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in found.items()
    ):
        raise Problem(
            400,
            'filterGroupBy: expected an object of strings, e.g. {"model": "gpt-4"},'
            f" of at most {MAX_FILTER} characters",
        )
    return found


@dataclass
class _Params:
    """A meter query's parameters, from the query string (GET) or a JSON body (POST)."""

    start: str | None = None
    end: str | None = None
    window: str | None = None
    tz: str | None = None
    subjects: list[str] = field(default_factory=list)
    group_by: list[str] = field(default_factory=list)
    filters: dict[str, str] = field(default_factory=dict)


def _from_query_string(request: Request) -> _Params:
    params = request.query_params
    filters = _filter_group_by(params["filterGroupBy"]) if params.get("filterGroupBy") else {}
    for param, value in params.multi_items():  # deepObject style: filterGroupBy[model]=gpt-4
        if param.startswith("filterGroupBy[") and param.endswith("]"):
            filters[param[len("filterGroupBy[") : -1]] = value
    return _Params(
        start=params.get("from") or None,
        end=params.get("to") or None,
        window=params.get("windowSize") or None,
        tz=params.get("windowTimeZone") or None,
        subjects=[s for s in params.getlist("subject") if s],
        group_by=[g for g in params.getlist("groupBy") if g],
        filters=filters,
    )


def _from_body(body: bytes) -> _Params:
    try:
        found = decode_json(body or b"{}")
    except ValueError as exc:
        raise Problem(400, f"request body is {exc}") from None
    if not isinstance(found, dict):
        raise Problem(400, "expected a JSON object of query parameters")

    def text(name: str) -> str | None:
        value = found.get(name)
        if value is not None and not isinstance(value, str):
            raise Problem(400, f"{name}: expected a string")
        return value

    def texts(name: str) -> list[str]:
        value = found.get(name) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Problem(400, f"{name}: expected a list of strings")
        return value

    filters: dict[str, str] = {}
    for name, values in (found.get("filterGroupBy") or {}).items():
        # The body's filter takes a list of values per group; one group value is what the
        # engine's filters hold (all must match), so a list has exactly one.
        one = values[0] if isinstance(values, list) and len(values) == 1 else values
        if not isinstance(one, str):
            raise Problem(400, f'filterGroupBy.{name}: give one value, e.g. ["gpt-4"]')
        filters[name] = one
    return _Params(
        start=text("from"),
        end=text("to"),
        window=text("windowSize"),
        tz=text("windowTimeZone"),
        subjects=texts("subject"),
        group_by=texts("groupBy"),
        filters=filters,
    )


def _accounts(params: _Params, key: ApiKey, svc: Services) -> tuple[str, ...]:
    """The subjects asked for, each readable by the key; else all the key may read."""
    for subject in params.subjects:
        if not can_read(svc.store, key, subject):
            raise Problem(404, f"subject {subject!r} not found, or this key may not read it")
    if params.subjects:
        return tuple(dict.fromkeys(params.subjects))
    if key.account_id is None:
        return tuple(a.id for a in svc.store.list_accounts())
    if not can_read(svc.store, key, key.account_id):
        raise Problem(403, "this key may not read usage: it has no read scope")
    return tuple(svc.store.descendants(key.account_id))


def _query(params: _Params, meter: OpenMeterMeter, key: ApiKey, svc: Services) -> UsageQuery:
    errors: list[str] = []
    tz = params.tz or "UTC"
    zone = None
    try:
        zone = parse_zone(tz)
    except ValueError as exc:
        errors.append(f"windowTimeZone: {exc}")
    granularity = Granularity.TOTAL
    if params.window is not None:
        if params.window.upper() not in WINDOWS:
            errors.append(f"windowSize: {params.window!r} is not supported; use HOUR, DAY or MONTH")
        else:
            granularity = WINDOWS[params.window.upper()]
    start, end = FROM_DEFAULT, svc.now()
    for name, given in (("from", params.start), ("to", params.end)):
        if given:
            try:
                instant = parse_instant(given, zone or parse_zone("UTC"))
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
                continue
            start, end = (instant, end) if name == "from" else (start, instant)
    if start >= end:
        errors.append("from: must be before to")
    group_by = list(params.group_by)
    for name in group_by:
        if name != "subject" and name not in meter.group_by:
            known = ", ".join(["subject", *meter.group_by])
            errors.append(f"groupBy: meter {meter.slug!r} has no group {name!r}; use {known}")
    for name in params.filters:
        if name not in meter.group_by:
            errors.append(f"filterGroupBy: meter {meter.slug!r} has no group {name!r}")
    if errors:
        raise Problem(400, "; ".join(errors), {"errors": errors})

    if params.subjects and "subject" not in group_by:
        group_by.append("subject")  # as OpenMeter: filtering by subjects also groups by them
    query = UsageQuery(
        accounts=_accounts(params, key, svc),
        metric=meter.event_type,
        start=start,
        end=end,
        granularity=granularity,
        tz=tz,
        aggregations=(meter.aggregation,),
        group_by=tuple(GROUP_SUBACCOUNT if g == "subject" else g for g in group_by),
        filters=tuple(sorted(params.filters.items())),
        unique_dimension=meter.dimension,
    )
    if len(svc.engine.buckets(replace(query, limit=MAX_WINDOWS + 1))) > MAX_WINDOWS:
        raise Problem(
            400, f"more than {MAX_WINDOWS} windows: give a later from, or a larger windowSize"
        )
    return query


def _rows(result: Result, window: str | None) -> dict[str, Any]:
    query = result.query
    rows = []
    for bucket in result.buckets:
        for group in bucket.groups:  # OpenMeter leaves out the windows without usage
            values = group.as_dict()
            subject = values.pop(GROUP_SUBACCOUNT, None)
            rows.append(
                {
                    "value": number(group.values[0]),
                    "windowStart": isoformat(bucket.start),
                    "windowEnd": isoformat(bucket.end),
                    "subject": subject,
                    "groupBy": values,
                }
            )
    return {
        "from": isoformat(query.start),
        "to": isoformat(query.end),
        "windowSize": window.upper() if window else None,
        "data": rows,
    }


async def _answer(request: Request, slug: str, read: Callable[[], Awaitable[_Params]]) -> Response:
    try:
        key = _caller(request)
        svc = services(request)
        meter = _meter(svc, slug)
        params = await read()
        query = _query(params, meter, key, svc)
        try:
            result = svc.engine.run(query)
        except ValueError as exc:
            raise Problem(400, str(exc)) from None
    except Problem as problem:
        return problem.response(request)
    return JSONResponse(_rows(result, params.window))


@router.get("/api/v1/meters/{slug}/query")
async def query_meter(request: Request, slug: str) -> Response:
    """A meter's usage per window (or over the whole range without ``windowSize``)."""

    async def read() -> _Params:
        return _from_query_string(request)

    return await _answer(request, slug, read)


@router.post(
    "/api/v1/meters/{slug}/query",
    openapi_extra=body_doc(
        "application/json",
        {"from": "2025-01-01T00:00:00Z", "windowSize": "DAY", "windowTimeZone": "Asia/Kolkata"},
    ),
)
async def query_meter_post(request: Request, slug: str) -> Response:
    """The same query, its parameters in a JSON body (the client's ``meters.query``)."""

    async def read() -> _Params:
        body = await read_body(request, Problem(413, "a request body holds at most 16 MiB"))
        return _from_body(body)

    return await _answer(request, slug, read)


async def _values(request: Request, slug: str, group: str) -> Response:
    """The values of one group (``subject`` or one of the meter's) that have usage between
    ``from`` and ``to``, as OpenMeter lists them: sorted text."""
    try:
        key = _caller(request)
        svc = services(request)
        meter = _meter(svc, slug)
        given = request.query_params
        params = _Params(start=given.get("from"), end=given.get("to"), group_by=[group])
        result = svc.engine.run(_query(params, meter, key, svc))
    except Problem as problem:
        return problem.response(request)
    name = GROUP_SUBACCOUNT if group == "subject" else group
    found = {g.as_dict()[name] for g in result.totals}
    return JSONResponse(sorted(v for v in found if v is not None))


@router.get("/api/v1/meters/{slug}/subjects")
async def list_subjects(request: Request, slug: str) -> Response:
    """The subjects (accounts) with usage of the meter."""
    return await _values(request, slug, "subject")


@router.get("/api/v1/meters/{slug}/group-by/{group}/values")
async def list_group_values(request: Request, slug: str, group: str) -> Response:
    """The values one of the meter's groups takes in its usage."""
    return await _values(request, slug, group)
