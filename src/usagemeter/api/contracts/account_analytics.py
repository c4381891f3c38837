"""GET /v1/accounts/{account_id}/analytics/usage: conversation usage per zone-aligned bucket.

Seed 003 (issue 6). Metric ``conversations``: per bucket and group, ``conversations`` is the
number of events and ``seconds`` the sum of their values, over the account and every account
below it. Errors use FastAPI's envelope: ``{"detail": [{"loc", "msg", "type"}]}`` for bad
parameters (422), ``{"detail": "..."}`` otherwise. Parameters are parsed here, not by FastAPI,
so every problem is reported at once and in this shape.

Checks run in FastAPI's own order: the key (401), then the parameters (422), then tenancy
(404), so an unreadable account and an unknown one answer alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
from fastapi import APIRouter, Path, Query, Request, Security
from fastapi.security import APIKeyHeader

from usagemeter.api.openapi import standalone_schema
from usagemeter.api.params import ascii_int
from usagemeter.api.responses import JSONResponse, number
from usagemeter.api.services import services
from usagemeter.auth import authenticate, can_read
from usagemeter.ingest import MAX_TS_MS, MIN_TS_MS
from usagemeter.model import GROUP_SUBACCOUNT, Aggregation, GroupValues, Result
from usagemeter.model import Query as UsageQuery
from usagemeter.timewindows import (
    Granularity,
    from_ms,
    isoformat,
    parse_instant,
    parse_zone,
)

router = APIRouter()

PATH = "/v1/accounts/{account_id}/analytics/usage"
METRIC = "conversations"
MAX_LIMIT = 500
DEFAULT_SPAN = timedelta(days=30)
# Usage can only be recorded inside these instants (ingest rejects the rest), so a range
# outside them is a mistake; bounding it also keeps bucket arithmetic away from year 9999.
EARLIEST = from_ms(MIN_TS_MS)
LATEST = from_ms(MAX_TS_MS)

# The auto_error=False scheme only documents the header; a missing key is answered below in
# this contract's envelope, not with FastAPI's 403.
API_KEY = APIKeyHeader(
    name="X-API-Key",
    scheme_name="X-API-Key",
    description="An account key (reads its account and descendants) or an operator key.",
    auto_error=False,
)


class GroupBy(StrEnum):
    AGENT = "agent"
    SUBACCOUNT = "subaccount"
    TYPE = "type"


# ``agent`` and ``type`` are event dimensions; ``subaccount`` is the engine's group of the
# account each event belongs to.
ENGINE_GROUP: dict[GroupBy, str] = {
    GroupBy.AGENT: "agent",
    GroupBy.SUBACCOUNT: GROUP_SUBACCOUNT,
    GroupBy.TYPE: "type",
}
API_GROUP: dict[str, str] = {engine: api.value for api, engine in ENGINE_GROUP.items()}

GRANULARITIES = (Granularity.HOUR, Granularity.DAY, Granularity.MONTH)


# ------------------------------------------------------------------ response shapes


class UsageValue(msgspec.Struct):
    seconds: int | float
    conversations: int
    dimensions: dict[str, str | None]


class UsageBucket(msgspec.Struct):
    ts: str
    values: list[UsageValue]


class UsageMeta(msgspec.Struct):
    account_id: str
    start: str
    end: str
    granularity: str
    group_by: list[str]
    tz: str


class UsageResponse(msgspec.Struct):
    meta: UsageMeta
    data: list[UsageBucket]


class ValidationIssue(msgspec.Struct, omit_defaults=True):
    loc: list[str]
    msg: str
    type: str
    input: str | None = None


class ValidationErrorBody(msgspec.Struct):
    detail: list[ValidationIssue]


class ErrorBody(msgspec.Struct):
    detail: str


def _doc(model: type[Any], description: str, example: Any) -> dict[str, Any]:
    content = {"application/json": {"schema": standalone_schema(model), "example": example}}
    return {"description": description, "content": content}


EXAMPLE = {
    "meta": {
        "account_id": "acme",
        "start": "2024-03-09T00:00:00-05:00",
        "end": "2024-03-11T00:00:00-04:00",
        "granularity": "day",
        "group_by": ["agent"],
        "tz": "America/New_York",
    },
    "data": [
        {
            "ts": "2024-03-09T00:00:00-05:00",
            "values": [{"seconds": 95.5, "conversations": 2, "dimensions": {"agent": "a1"}}],
        },
        {"ts": "2024-03-10T00:00:00-05:00", "values": []},
    ],
}

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _doc(UsageResponse, "Usage per bucket, every bucket of the range.", EXAMPLE),
    401: _doc(ErrorBody, "No X-API-Key header, or not a live key.", {"detail": "invalid API key"}),
    404: _doc(
        ErrorBody,
        "No such account, or this key may not read it.",
        {"detail": "account 'acme' not found"},
    ),
    422: _doc(
        ValidationErrorBody,
        "Invalid parameters: every problem at once.",
        {
            "detail": [
                {
                    "loc": ["query", "tz"],
                    "msg": "unknown time zone 'Mars/Base': use an IANA zone name such as"
                    " 'America/New_York'",
                    "type": "value_error",
                    "input": "Mars/Base",
                }
            ]
        },
    ),
}


# ------------------------------------------------------------------------- params


@dataclass(frozen=True, slots=True)
class UsageParams:
    """The parameters once valid: the range in the query zone, half-open."""

    start: datetime
    end: datetime
    granularity: Granularity
    group_by: tuple[GroupBy, ...]
    tz: str
    zone: ZoneInfo
    limit: int


class Invalid(Exception):
    def __init__(self, issues: list[ValidationIssue]) -> None:
        super().__init__("; ".join(i.msg for i in issues))
        self.issues = issues


_DIGITS = re.compile(r"[+-]?[0-9]+")  # ASCII only: "٣" is not a number here


def _whole_ms(t: datetime) -> datetime:
    # Events are stamped in milliseconds; the echoed range is exactly what is counted.
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def parse_params(
    *,
    start: str | None,
    end: str | None,
    granularity: str | None,
    group_by: list[str] | None,
    tz: str | None,
    limit: str | None,
    now: datetime,
) -> UsageParams:
    """Every problem with the parameters at once (``Invalid``), or the parsed parameters."""
    issues: list[ValidationIssue] = []

    def fail(param: str, msg: str, type_: str, value: str | None) -> None:
        issues.append(ValidationIssue(["query", param], msg, type_, value))

    tz_name = "UTC" if tz is None else tz
    zone: ZoneInfo | None = None
    try:
        zone = parse_zone(tz_name)
    except ValueError as exc:
        fail("tz", str(exc), "value_error", tz)
    # With a bad tz, naive instants are still checked (as UTC) so their errors show too.
    reading_zone = zone or ZoneInfo("UTC")

    def instant(param: str, text: str) -> datetime | None:
        message = (
            f"Input should be an ISO-8601 date-time such as '2024-03-10T00:00:00Z' or"
            f" '2024-03-10T00:00:00-05:00' (without an offset it is read in tz), got {text!r}"
        )
        if _DIGITS.fullmatch(text.strip()):
            fail(param, message, "datetime_from_date_parsing", text)
            return None
        try:
            t = _whole_ms(parse_instant(text, reading_zone))
        except ValueError:
            fail(param, message, "datetime_from_date_parsing", text)
            return None
        return t

    def bounded(param: str, t: datetime | None, given: str | None) -> datetime | None:
        if t is None or EARLIEST <= t <= LATEST:
            return t
        fail(
            param,
            f"{param} must be between {isoformat(EARLIEST)} and {isoformat(LATEST)},"
            " the instants usage can be recorded at",
            "value_error",
            given,
        )
        return None

    start_t = bounded("start", instant("start", start), start) if start is not None else None
    end_t = bounded("end", instant("end", end) if end is not None else now, end)
    if start is None and end_t is not None:
        # 30 calendar days in tz: a wall-clock step, so a default range ending at local
        # midnight starts at local midnight even across a DST change. The round trip
        # through UTC turns a wall time that does not exist into a real one.
        local = end_t.astimezone(reading_zone) - DEFAULT_SPAN
        start_t = max(local.astimezone(UTC), EARLIEST).astimezone(reading_zone)
    if start_t is not None and end_t is not None and start_t >= end_t:
        fail(
            "start",
            f"start ({isoformat(start_t)}) must be before end ({isoformat(end_t)})",
            "value_error",
            start,
        )

    granularity_v = Granularity.DAY
    if granularity is not None:
        try:
            granularity_v = Granularity(granularity)
        except ValueError:
            granularity_v = Granularity.TOTAL  # any non-hour/day/month: rejected below
        if granularity_v not in GRANULARITIES:
            fail("granularity", "Input should be 'hour', 'day' or 'month'", "enum", granularity)

    groups: list[GroupBy] = []
    for raw in group_by or []:
        # Comma-separated, repeated, or both; empty items are skipped, repeats kept once.
        for item in (part.strip() for part in raw.split(",")):
            if not item:
                continue
            try:
                g = GroupBy(item)
            except ValueError:
                fail("group_by", "Input should be 'agent', 'subaccount' or 'type'", "enum", item)
                continue
            if g not in groups:
                groups.append(g)

    limit_v = MAX_LIMIT
    if limit is not None:
        if not _DIGITS.fullmatch(limit.strip()):
            fail(
                "limit",
                "Input should be a valid integer, unable to parse string as an integer",
                "int_parsing",
                limit,
            )
        elif (ascii_int(limit) or 0) < 1:
            fail("limit", "Input should be greater than or equal to 1", "greater_than_equal", limit)
        elif (ascii_int(limit) or 0) > MAX_LIMIT:
            fail(
                "limit",
                f"Input should be less than or equal to {MAX_LIMIT}",
                "less_than_equal",
                limit,
            )
        else:
            limit_v = ascii_int(limit) or MAX_LIMIT

    if issues:
        raise Invalid(issues)
    assert zone is not None and start_t is not None and end_t is not None
    return UsageParams(
        start=start_t.astimezone(zone),
        end=end_t.astimezone(zone),
        granularity=granularity_v,
        group_by=tuple(groups),
        tz=tz_name,
        zone=zone,
        limit=limit_v,
    )


# ------------------------------------------------------------------------- render


def _value(result: Result, group: GroupValues) -> UsageValue:
    by = dict(zip(result.aggregations, group.values, strict=True))
    return UsageValue(
        seconds=number(by[Aggregation.SUM]),
        conversations=int(by[Aggregation.COUNT]),
        dimensions={API_GROUP[name]: value for name, value in group.group},
    )


def render(account_id: str, params: UsageParams, result: Result) -> UsageResponse:
    data = []
    for bucket in result.buckets:
        values = [_value(result, g) for g in bucket.groups]
        if not params.group_by and not values:
            values = [UsageValue(seconds=0, conversations=0, dimensions={})]  # idle bucket
        data.append(UsageBucket(ts=isoformat(bucket.start), values=values))
    meta = UsageMeta(
        account_id=account_id,
        start=isoformat(params.start),
        end=isoformat(params.end),
        granularity=params.granularity.value,
        group_by=[g.value for g in params.group_by],
        tz=params.tz,
    )
    return UsageResponse(meta=meta, data=data)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(ErrorBody(detail), status_code=status)


# -------------------------------------------------------------------------- route


@router.get(
    PATH,
    tags=["analytics"],
    summary="Get usage analytics",
    description=(
        "Conversations and conversation seconds of an account and its subaccounts, per hour,"
        " day or month aligned in an IANA time zone (DST and fractional offsets included),"
        " optionally grouped by agent, conversation type and subaccount. Every bucket of"
        " [start, end) appears, the first and last clipped to the range."
    ),
    responses=RESPONSES,
)
async def get_usage_analytics(
    request: Request,
    account_id: str = Path(description="The account; its subaccounts' usage is included."),
    start: str | None = Query(
        None,
        description="Start, inclusive (ISO-8601 date-time; without an offset it is read in"
        " tz). Defaults to 30 days before end.",
    ),
    end: str | None = Query(
        None,
        description="End, exclusive (ISO-8601 date-time; without an offset it is read in tz)."
        " Defaults to now.",
    ),
    granularity: str | None = Query(
        None, description="Bucket granularity: hour, day (default) or month."
    ),
    group_by: list[str] | None = Query(
        None,
        description="Dimensions to break results by: agent, subaccount, type (comma"
        " separated or repeated).",
    ),
    tz: str | None = Query(
        None, description="IANA time zone name used for bucket boundaries (default UTC)."
    ),
    limit: str | None = Query(
        None, description="Maximum number of time buckets to return, 1 to 500 (default 500)."
    ),
    api_key: str | None = Security(API_KEY),
) -> JSONResponse:
    svc = services(request)
    secret = api_key.strip() if api_key else None
    if not secret:
        return _error(401, "missing API key: send it in the X-API-Key header")
    key = authenticate(svc.store, secret)
    if key is None:
        return _error(401, "invalid API key")
    try:
        params = parse_params(
            start=start,
            end=end,
            granularity=granularity,
            group_by=group_by,
            tz=tz,
            limit=limit,
            now=svc.now(),
        )
    except Invalid as exc:
        return JSONResponse(ValidationErrorBody(exc.issues), status_code=422)
    if not can_read(svc.store, key, account_id):
        return _error(404, f"account {account_id!r} not found")
    query = UsageQuery(
        accounts=tuple(svc.store.descendants(account_id)),
        metric=METRIC,
        start=params.start,
        end=params.end,
        granularity=params.granularity,
        tz=params.tz,
        aggregations=(Aggregation.COUNT, Aggregation.SUM),
        group_by=tuple(ENGINE_GROUP[g] for g in params.group_by),
        limit=params.limit,
    )
    result = svc.engine.run(query)
    return JSONResponse(render(account_id, params, result))
