"""GET /v1/account/usage/: an account's requests per UTC day over an inclusive date range.

The contract is seed 002 (issue #5). Its shape, parameter names and error envelope are the
seed's; where the seed is silent the decisions are commented beside the code that makes them.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request, Security
from fastapi.security import APIKeyHeader

from usagemeter.api.credentials import header_secret
from usagemeter.api.responses import JSONResponse
from usagemeter.api.services import services
from usagemeter.auth import authenticate, can_read
from usagemeter.model import Aggregation, ApiKey, Scope
from usagemeter.model import Query as UsageQuery
from usagemeter.timewindows import Granularity

router = APIRouter()
log = logging.getLogger("usagemeter")

PATH = "/v1/account/usage/"
KEY_HEADER = "X-Api-Key"
METRIC = "requests"
MAX_DAYS = 90  # counting both ends: 2025-01-01 to 2025-03-31 is 90 days
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
FORBIDDEN = {"message": "Forbidden"}

# The same scheme as GET /v1/accounts/{id}/analytics/usage (headers are case-insensitive), so
# one "Authorize" in the API docs serves both endpoints.
_api_key = APIKeyHeader(
    name="X-API-Key",
    scheme_name="X-API-Key",
    description="An account key (reads its account and descendants) or an operator key.",
    auto_error=False,  # a missing key gets this contract's 403 body, not the framework's
)


@dataclass(frozen=True, slots=True)
class Invalid:
    """One problem with one parameter."""

    field: str
    validation_error: str  # short, for meta.validation_error
    long_message: str  # what was wrong and how to fix it


class Problem(Exception):
    """An error in this contract's envelope, with a trace id that the server log repeats."""

    def __init__(
        self, status: int, message: str, long_message: str, invalid: Invalid | None = None
    ) -> None:
        super().__init__(long_message)
        self.status = status
        self.message = message
        self.long_message = long_message
        self.invalid = invalid

    def response(self, request: Request) -> JSONResponse:
        trace_id = uuid.uuid4().hex
        field = self.invalid.field if self.invalid else None
        # The trace id ties a client's report to this line of the server log.
        log.warning(
            "%s %s -> %d wp_trace_id=%s field=%s: %s",
            request.method,
            request.url.path,
            self.status,
            trace_id,
            field,
            self.long_message,
        )
        meta = (
            {"field": self.invalid.field, "validation_error": self.invalid.validation_error}
            if self.invalid
            else None
        )
        body = {
            "error": {
                "code": self.status,
                "message": self.message,
                "long_message": self.long_message,
                "meta": meta,
            },
            "wp_trace_id": trace_id,
        }
        return JSONResponse(body, status_code=self.status)


class Forbidden(Exception):
    """No key, an unknown or revoked one, or one that may not read usage."""


MISSING_ACCOUNT = Invalid(
    "account",
    "required with an operator key",
    "account is required with an operator key: add account=<account id>.",
)


def bad_request(problems: list[Invalid]) -> Problem:
    """Every problem in ``long_message``, so a caller fixes them in one go; ``meta`` names the
    first, since the envelope has room for one field."""
    return Problem(400, "Bad Request", " ".join(p.long_message for p in problems), problems[0])


def _date(name: str, value: str | None) -> tuple[date | None, Invalid | None]:
    if not value:
        return None, Invalid(
            name, "required", f"{name} is required: add {name}=YYYY-MM-DD, e.g. 2025-09-12."
        )
    if _DATE.fullmatch(value):
        try:
            return date.fromisoformat(value), None
        except ValueError:
            return None, Invalid(
                name,
                "not a calendar date",
                f"{name} {value!r} is not a calendar date: use a real day as YYYY-MM-DD,"
                " e.g. 2025-09-12.",
            )
    return None, Invalid(
        name,
        "invalid date format",
        f"{name} {value!r} is not a date as YYYY-MM-DD: use e.g. 2025-09-12.",
    )


def parse_range(start_date: str | None, end_date: str | None) -> tuple[date, date, list[Invalid]]:
    """The inclusive UTC dates asked for, and every problem with them (dates unusable when
    there is one)."""
    start, start_problem = _date("start_date", start_date)
    end, end_problem = _date("end_date", end_date)
    problems = [p for p in (start_problem, end_problem) if p]
    if start and end:
        if start > end:
            problems.append(
                Invalid(
                    "start_date",
                    "after end_date",
                    f"start_date {start} is after end_date {end}: start_date must be on or"
                    " before end_date.",
                )
            )
        elif (end - start).days + 1 > MAX_DAYS:
            problems.append(
                Invalid(
                    "end_date",
                    f"range longer than {MAX_DAYS} days",
                    f"{start} to {end} is {(end - start).days + 1} days: at most {MAX_DAYS} days"
                    f" are allowed, counting both ends; e.g. end_date"
                    f" {start + timedelta(days=MAX_DAYS - 1)}.",
                )
            )
    return start or date.min, end or date.min, problems


def _caller(request: Request) -> ApiKey:
    key = authenticate(services(request).store, header_secret(request, KEY_HEADER))
    if key is None or not (key.is_operator or Scope.READ in key.scopes):
        raise Forbidden
    return key


def _account(request: Request, key: ApiKey, account: str | None) -> str:
    """An account key reads its own account, or with ``?account=`` one below it (a parent
    sees its children); an operator key must name the account."""
    account_id = account or key.account_id
    if not account_id:
        raise bad_request([MISSING_ACCOUNT])
    if not can_read(services(request).store, key, account_id):
        # The same answer for an account that does not exist and one of another tenant.
        raise Problem(
            404,
            "Not Found",
            f"account {account_id!r} does not exist, or this key may not read it: check the"
            " account id.",
        )
    return account_id


def _midnight(d: date) -> datetime:
    return datetime.combine(d, time(), UTC)


def _usage(
    request: Request, start_date: str | None, end_date: str | None, account: str | None
) -> JSONResponse:
    key = _caller(request)
    start, end, problems = parse_range(start_date, end_date)
    if key.is_operator and not account:
        problems.append(MISSING_ACCOUNT)
    if problems:
        raise bad_request(problems)
    account_id = _account(request, key, account)

    svc = services(request)
    today = svc.now().astimezone(UTC).date()
    # The dates are inclusive UTC days: [start_date 00:00, end_date + 1 day 00:00), cut at the
    # end of today, since the contract lists no day after today. Usage is counted as soon as
    # ingest acknowledges it, so today's count grows during the day.
    last = min(end, today)
    usage: list[dict[str, Any]] = []
    if start <= last:
        result = svc.engine.run(
            UsageQuery(
                # Every request, billable or not and whatever its status, of the account and
                # every account below it.
                accounts=tuple(svc.store.descendants(account_id)),
                metric=METRIC,
                start=_midnight(start),
                end=_midnight(last + timedelta(days=1)),
                granularity=Granularity.DAY,
                tz="UTC",
                aggregations=(Aggregation.COUNT,),
            )
        )
        counts = [
            (b.start.astimezone(UTC).date(), int(sum(g.values[0] for g in b.groups)))
            for b in result.buckets
        ]
        # From the first day with usage on, every day, zero-filled (seed: "returned only from
        # the first date of actual usage in the specified duration").
        first = next((i for i, (_, n) in enumerate(counts) if n), len(counts))
        usage = [{"date": d.isoformat(), "request_count": n} for d, n in counts[first:]]
    body = {
        "time_range": {"start_date": start.isoformat(), "end_date": end.isoformat()},
        "usage_data": usage,
        "total_requests_in_timeperiod": sum(u["request_count"] for u in usage),
    }
    return JSONResponse(body)


def _doc(description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"example": example}}}


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _doc(
        "Requests per UTC day from the first day with usage to end_date (or today).",
        {
            "time_range": {"start_date": "2025-09-01", "end_date": "2025-09-03"},
            "usage_data": [
                {"date": "2025-09-02", "request_count": 12},
                {"date": "2025-09-03", "request_count": 0},
            ],
            "total_requests_in_timeperiod": 12,
        },
    ),
    400: _doc(
        "A missing or malformed date, start_date after end_date, more than 90 days, or an"
        " operator key without account.",
        {
            "error": {
                "code": 400,
                "message": "Bad Request",
                "long_message": "start_date '2025/09/12' is not a date as YYYY-MM-DD: use e.g."
                " 2025-09-12.",
                "meta": {"field": "start_date", "validation_error": "invalid date format"},
            },
            "wp_trace_id": "3b0b537a60d84057817bb40563ca5c99",
        },
    ),
    403: _doc("Missing or invalid X-Api-Key.", FORBIDDEN),
    404: _doc(
        "The account does not exist, or the key may not read it.",
        {
            "error": {
                "code": 404,
                "message": "Not Found",
                "long_message": "account 'acme-x' does not exist, or this key may not read it:"
                " check the account id.",
                "meta": None,
            },
            "wp_trace_id": "550e8400e29b41d4a716446655440000",
        },
    ),
}


# Both spellings answer directly: a redirect would drop the X-Api-Key header in some clients.
@router.get(PATH.rstrip("/"), include_in_schema=False)
@router.get(
    PATH,
    tags=["contract: account usage"],
    summary="Retrieve usage data for a specific time range",
    dependencies=[Security(_api_key)],
    responses=_RESPONSES,
)
async def account_usage(
    request: Request,
    start_date: str | None = Query(
        None,
        description="Required. First day, YYYY-MM-DD (UTC), inclusive.",
        examples=["2025-09-12"],
    ),
    end_date: str | None = Query(
        None,
        description="Required. Last day, YYYY-MM-DD (UTC), inclusive; at most 90 days after"
        " start_date counting both ends. Days after today are not listed.",
        examples=["2025-09-12"],
    ),
    account: str | None = Query(
        None,
        description="Account id. Required with an operator key; an account key reads its own"
        " account by default, or one of its subaccounts.",
    ),
) -> JSONResponse:
    """Requests made by an account and its subaccounts per UTC day: every request, 2xx, 4xx
    and 5xx, billable or not. `usage_data` starts at the first day with usage in the range
    and lists every day from there to `end_date` (or today, if earlier), zero-filled."""
    try:
        return _usage(request, start_date, end_date, account)
    except Forbidden:
        return JSONResponse(FORBIDDEN, status_code=403)
    except Problem as problem:
        return problem.response(request)
