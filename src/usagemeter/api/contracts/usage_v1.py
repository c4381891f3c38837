"""GET /v1/usage: an account's API consumption per UTC day and metric (ApiCalls, Events,
Sessions, StorageBytes, BotAnalyses) over an inclusive date range, with totals.

The contract is seed 004 (issue #7). Its shape and parameter names are the seed's; where the
seed is silent the decisions are commented beside the code that makes them:

- Bounds. A date is its whole UTC day. A date-time is an instant, inclusive at millisecond
  precision, so endDate T counts ``[start, T + 1 ms)``. A date-time without an offset is UTC.
- Defaults. endDate is today (UTC), the whole day. startDate is 30 days before endDate: the
  date 30 days earlier for a date (so 31 days are counted), the instant 30 days earlier for a
  date-time.
- Range limit. At most 366 days, counted inclusively: 2024-01-01 to 2024-12-31 is 366 days
  and allowed, 2024-01-01 to 2025-01-01 is 367 and refused. For date-times, the counted span
  ``[start, end + 1 ms)`` may be at most 366 x 24 hours.
- Order. ``data`` is ordered by period, then by metric in the seed's order: ApiCalls, Events,
  Sessions, StorageBytes, BotAnalyses; ``totals`` lists every requested metric in that order,
  0 when there was no usage.
- Scope. The account and every account below it (DESIGN.md: a parent sees its children).
  StorageBytes is a gauge per account: a day's value, and the total, add up each account's
  latest report (a parent's storage is its own plus its subaccounts'). Sessions are distinct
  session_id values over the whole scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request, Security
from fastapi.security import HTTPBearer

from usagemeter.api.credentials import bearer_secret
from usagemeter.api.responses import ApiError, JSONResponse
from usagemeter.api.services import Services, services
from usagemeter.auth import authenticate, can_read
from usagemeter.ingest import MAX_TS_MS, MIN_TS_MS
from usagemeter.model import GROUP_SUBACCOUNT, ApiKey, Result, Scope
from usagemeter.model import Query as UsageQuery
from usagemeter.timewindows import Granularity, from_ms, isoformat, parse_instant, to_ms

router = APIRouter()

PATH = "/v1/usage"
# The seed's metric names, in the seed's order: the order of data and totals.
METRICS = ("ApiCalls", "Events", "Sessions", "StorageBytes", "BotAnalyses")
_CANONICAL = {m.lower(): m for m in METRICS}
GAUGE = "StorageBytes"  # summed over accounts: each account's latest value
DEFAULT_DAYS = 30
MAX_DAYS = 366
_DAY = timedelta(days=1)
_DAY_MS = 24 * 60 * 60 * 1000
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# A date-time starts with a date and a separator. Digits alone are not ISO 8601 here (the
# time module would read them as epoch milliseconds).
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]")

_bearer = HTTPBearer(
    auto_error=False,  # a missing key is answered here, in this contract's envelope
    scheme_name="bearer",
    description="`Authorization: Bearer <key>`: an account key, or an operator key with"
    " `?account=`.",
)


@dataclass(frozen=True, slots=True)
class Span:
    """The dates shown and the half-open instants ``[start, end)`` counted, in UTC."""

    start_date: date
    end_date: date
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class _Bound:
    """A parsed startDate or endDate: a whole UTC day, or an instant (epoch ms)."""

    day: date | None = None
    ms: int | None = None


def _midnight(d: date) -> datetime:
    return datetime.combine(d, time(), UTC)


Error = dict[str, Any]  # one problem: param, code, message (and what else helps fix it)


def _parse_bound(name: str, raw: str, errors: list[Error]) -> _Bound | None:
    text = raw.strip()
    shown = repr(raw if len(raw) <= 40 else raw[:40] + "...")
    if not _DATE_TIME.match(text) and not _DATE.fullmatch(text):
        errors.append(
            {
                "param": name,
                "code": "invalid_date",
                "message": f"{name}: {shown} is not ISO 8601: send a date such as 2025-01-31"
                " or a date-time such as 2025-01-31T12:00:00Z",
            }
        )
        return None
    try:
        if _DATE.fullmatch(text):
            day = date.fromisoformat(text)
            bound, ms = _Bound(day=day), to_ms(_midnight(day))
        else:
            ms = to_ms(parse_instant(text))
            bound = _Bound(ms=ms)
        # The years events may carry (ingest refuses others); this also keeps the date
        # arithmetic below away from the ends of year 1 and 9999.
        if not MIN_TS_MS <= ms < MAX_TS_MS:
            raise ValueError("outside the years 1970-2199")
    except ValueError as exc:
        problem = str(exc).removeprefix(f"invalid instant {text!r}: ")
        if "epoch milliseconds" in problem:  # the time module's hint; not accepted here
            problem = "expected a date-time such as 2025-01-31T12:00:00Z or ...T12:00:00+02:00"
        hint = " (in a URL, write a '+' offset as %2B)" if " " in text else ""
        errors.append(
            {
                "param": name,
                "code": "invalid_date",
                "message": f"{name}: {shown} is not a valid date or date-time: {problem}{hint}",
            }
        )
        return None
    return bound


def span(
    today: date, start_date: str | None, end_date: str | None, errors: list[Error]
) -> Span | None:
    """The range the parameters ask for, or None with its problems added to ``errors``."""
    failed = len(errors)
    start = _parse_bound("startDate", start_date, errors) if start_date is not None else None
    end = _parse_bound("endDate", end_date, errors) if end_date is not None else None
    if len(errors) > failed:
        return None
    end = end or _Bound(day=today)
    if end.day is not None:
        end_ms = to_ms(_midnight(end.day + _DAY))
    else:
        assert end.ms is not None
        end_ms = end.ms + 1  # inclusive to the millisecond
    if start is None:
        start = (
            _Bound(day=end.day - timedelta(days=DEFAULT_DAYS))
            if end.day is not None
            else _Bound(ms=end_ms - 1 - DEFAULT_DAYS * _DAY_MS)
        )
    start_ms = to_ms(_midnight(start.day)) if start.day is not None else start.ms
    assert start_ms is not None
    first, last = from_ms(start_ms), from_ms(end_ms - 1)
    if start_ms >= end_ms:
        which = "" if end_date is not None else " (endDate defaults to today, UTC)"
        errors.append(
            {
                "param": "startDate",
                "code": "invalid_range",
                "message": f"startDate ({isoformat(first)}) is after endDate"
                f" ({isoformat(last)}){which}: startDate must not be after endDate",
            }
        )
        return None
    if end_ms - start_ms > MAX_DAYS * _DAY_MS:
        days = -(-(end_ms - start_ms) // _DAY_MS)
        errors.append(
            {
                "param": "startDate",
                "code": "range_too_long",
                "message": f"startDate to endDate spans {days} days; at most {MAX_DAYS} are"
                " allowed, both ends counted (2024-01-01 to 2024-12-31 is 366 days)",
            }
        )
        return None
    return Span(first.date(), last.date(), first, from_ms(end_ms))


def metrics(raw: str | None, errors: list[Error]) -> tuple[str, ...]:
    """The canonical names asked for; an unknown one is added to ``errors``."""
    if raw is None:
        return METRICS
    found = _CANONICAL.get(raw.strip().lower())
    if found is None:
        shown = repr(raw if len(raw) <= 40 else raw[:40] + "...")
        errors.append(
            {
                "param": "metric",
                "code": "invalid_metric",
                "message": f"metric: {shown} is not a metric; use one of {', '.join(METRICS)}"
                " (case-insensitive), or omit it for all of them",
                "allowed": list(METRICS),
            }
        )
        return ()
    return (found,)


def _invalid(errors: list[Error]) -> ApiError:
    """One 400 for every problem: the code is theirs when they share one."""
    message = "; ".join(e["message"] for e in errors)
    code = errors[0]["code"] if len({e["code"] for e in errors}) == 1 else "invalid_parameters"
    details: dict[str, Any] = {"errors": errors}
    for e in errors:
        if "allowed" in e:
            details["allowed"] = e["allowed"]
    return ApiError(400, code, message, details)


def _caller(request: Request) -> ApiKey:
    key = authenticate(services(request).store, bearer_secret(request))
    if key is None:
        given = "invalid or revoked key" if request.headers.get("authorization") else "no key"
        raise ApiError(401, "unauthorized", f"{given}: send 'Authorization: Bearer <your API key>'")
    return key


def _scope(svc: Services, key: ApiKey, account_id: str) -> tuple[str, ...]:
    """The account to report on and every account below it, once the caller may read it."""
    if not key.is_operator and Scope.READ not in key.scopes:
        raise ApiError(403, "forbidden", "this key may not read usage: use a key with read scope")
    if not can_read(svc.store, key, account_id):
        # The same answer for an account that does not exist and one of another tenant.
        raise ApiError(
            404,
            "not_found",
            f"account {account_id!r} not found, or this key may not read it",
            {"account": account_id},
        )
    return tuple(svc.store.descendants(account_id))


def _day_values(metric: str, result: Result) -> tuple[list[tuple[date, int]], int]:
    """(day, value) for each UTC day with usage, and the value over the whole range."""
    days = [
        (b.start.astimezone(UTC).date(), round(sum(g.values[0] for g in b.groups)))
        for b in result.buckets
        if b.groups
    ]
    # A gauge adds up each account's latest value; a sum or a distinct count is the engine's
    # total over the whole range (distinct sessions over the range, not a sum of days).
    total = sum(g.values[0] for g in result.totals) if metric == GAUGE else result.total[0]
    return days, round(total)


def _report(
    request: Request,
    start_date: str | None,
    end_date: str | None,
    metric: str | None,
    account: str | None,
) -> JSONResponse:
    key = _caller(request)
    svc = services(request)
    errors: list[Error] = []
    wanted = metrics(metric, errors)
    counted = span(svc.now().astimezone(UTC).date(), start_date, end_date, errors)
    account_id = account.strip() if account and account.strip() else key.account_id
    if not account_id:
        errors.append(
            {
                "param": "account",
                "code": "account_required",
                "message": "account: an operator key must name the account, add ?account=<id>",
            }
        )
    if errors:
        raise _invalid(errors)
    assert counted is not None and account_id is not None
    accounts = _scope(svc, key, account_id)
    data: list[tuple[date, int, str, int]] = []
    totals: dict[str, int] = {}
    for name in wanted:
        query = UsageQuery(
            accounts=accounts,
            metric=name,
            start=counted.start,
            end=counted.end,
            granularity=Granularity.DAY,
            tz="UTC",
            group_by=(GROUP_SUBACCOUNT,) if name == GAUGE else (),
        )
        try:
            result = svc.engine.run(query)
        except ValueError as exc:  # a meters file that cannot answer this metric
            raise ApiError(400, "invalid_request", str(exc)) from None
        days, totals[name] = _day_values(name, result)
        data.extend((day, METRICS.index(name), name, value) for day, value in days)
    data.sort()
    body = {
        "startDate": counted.start_date.isoformat(),
        "endDate": counted.end_date.isoformat(),
        "data": [
            {"period": day.isoformat(), "metricType": name, "value": value}
            for day, _, name, value in data
        ],
        "totals": totals,
    }
    return JSONResponse(body)


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
        }
    },
}


def _error_doc(description: str, status: int, code: str, message: str, **details: Any) -> Any:
    example = {"error": {"code": code, "message": message, "details": details}}
    return {
        "description": description,
        "content": {"application/json": {"schema": _ERROR_SCHEMA, "example": example}},
    }


_SUCCESS_SCHEMA = {
    "type": "object",
    "required": ["startDate", "endDate", "data", "totals"],
    "properties": {
        "startDate": {"type": "string", "format": "date"},
        "endDate": {"type": "string", "format": "date"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["period", "metricType", "value"],
                "properties": {
                    "period": {"type": "string", "format": "date"},
                    "metricType": {"type": "string", "enum": list(METRICS)},
                    "value": {"type": "integer", "format": "int64"},
                },
            },
        },
        "totals": {
            "type": "object",
            "additionalProperties": {"type": "integer", "format": "int64"},
        },
    },
}

_EXAMPLE = {
    "startDate": "2025-03-14",
    "endDate": "2025-03-15",
    "data": [
        {"period": "2025-03-14", "metricType": "ApiCalls", "value": 120},
        {"period": "2025-03-14", "metricType": "Sessions", "value": 7},
        {"period": "2025-03-14", "metricType": "StorageBytes", "value": 1048576},
        {"period": "2025-03-15", "metricType": "ApiCalls", "value": 80},
        {"period": "2025-03-15", "metricType": "Sessions", "value": 5},
    ],
    "totals": {
        "ApiCalls": 200,
        "Events": 0,
        "Sessions": 10,
        "StorageBytes": 1048576,
        "BotAnalyses": 0,
    },
}


@router.get(
    PATH,
    tags=["contract: usage v1"],
    summary="Get API consumption metrics for the integration over a date range",
    dependencies=[Security(_bearer)],
    responses={
        200: {
            "description": "Usage per UTC day and metric, and totals per metric.",
            "content": {"application/json": {"schema": _SUCCESS_SCHEMA, "example": _EXAMPLE}},
        },
        400: _error_doc(
            "A date that is not ISO 8601, startDate after endDate, a range over 366 days, an"
            " unknown metric, or an operator key without account.",
            400,
            "invalid_metric",
            "metric: 'Calls' is not a metric; use one of ApiCalls, Events, Sessions,"
            " StorageBytes, BotAnalyses (case-insensitive), or omit it for all of them",
            param="metric",
            allowed=list(METRICS),
        ),
        401: _error_doc(
            "Missing or invalid key.",
            401,
            "unauthorized",
            "no key: send 'Authorization: Bearer <your API key>'",
        ),
        403: _error_doc(
            "The key has no read scope.",
            403,
            "forbidden",
            "this key may not read usage: use a key with read scope",
        ),
        404: _error_doc(
            "The account does not exist, or the key may not read it.",
            404,
            "not_found",
            "account 'acme-eu' not found, or this key may not read it",
            account="acme-eu",
        ),
    },
)
async def usage_v1(
    request: Request,
    start_date: str | None = Query(
        None,
        alias="startDate",
        description="Inclusive lower bound: an ISO 8601 date (its whole UTC day) or date-time"
        " (UTC without an offset). Default: 30 days before endDate.",
        examples=["2025-02-13"],
    ),
    end_date: str | None = Query(
        None,
        alias="endDate",
        description="Inclusive upper bound: an ISO 8601 date (its whole UTC day) or date-time,"
        " inclusive to the millisecond. Default: today (UTC). At most 366 days in all.",
        examples=["2025-03-15"],
    ),
    metric: str | None = Query(
        None,
        description="One of ApiCalls, Events, Sessions, StorageBytes, BotAnalyses"
        " (case-insensitive). Default: all of them.",
        examples=["ApiCalls"],
    ),
    account: str | None = Query(
        None,
        description="Account id. Required with an operator key; an account key reads its own"
        " account by default, or one of its subaccounts.",
    ),
) -> JSONResponse:
    """API consumption of an account and its subaccounts per UTC day and metric. ApiCalls,
    Events and BotAnalyses are summed; Sessions counts distinct `session_id` values (the
    total is distinct over the whole range, not the sum of the days); StorageBytes is a
    gauge, each account's latest reported value. `data` lists each day and metric with
    usage, ordered by period and then ApiCalls, Events, Sessions, StorageBytes, BotAnalyses;
    `totals` lists every requested metric, 0 without usage."""
    try:
        return _report(request, start_date, end_date, metric, account)
    except ApiError as problem:
        return problem.response()
