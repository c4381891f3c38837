"""GET /analytics/detail-usage-time: an account's actions per day or per month, split into
app actions and API actions, over a preset period or the current billing cycle.

The contract is seed 000 (issue #3). Its shape, headers and period names are the seed's; where
the seed is silent the decisions are commented beside the code that makes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from fastapi import APIRouter, Header, Query, Request, Security
from fastapi.security import HTTPBearer

from usagemeter.api.credentials import bearer_secret
from usagemeter.api.responses import JSONResponse
from usagemeter.api.services import services
from usagemeter.auth import authenticate, can_read
from usagemeter.model import Aggregation, ApiKey, ResultBucket, Scope
from usagemeter.model import Query as UsageQuery
from usagemeter.store.base import NotFound
from usagemeter.timewindows import BillingCycle, Granularity, preset_range

router = APIRouter()

PATH = "/analytics/detail-usage-time"
API_VERSIONS = ("2025-09",)
TIME_PERIODS = ("7-days", "30-days", "3-months", "current-billing-cycle")
DEFAULT_PERIOD = "current-billing-cycle"
METRIC = "actions"
SOURCE = "source"  # the dimension that tells app actions from API actions
APP = "app"
# A period of at most this many days is reported per day; a longer one per month.
MAX_DAILY_DAYS = 31
# An account without a billing cycle is billed per calendar month: cycles anchored on a 1st.
CALENDAR_MONTH = BillingCycle(date(2000, 1, 1), "month")
# English abbreviations, not strftime("%b"), which follows the server's locale.
MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Scheme name and text shared with the other bearer-key endpoints: one "Authorize" in the API
# docs serves them all.
_bearer = HTTPBearer(
    auto_error=False,  # we answer a missing key ourselves, in this contract's envelope
    scheme_name="bearer",
    description="`Authorization: Bearer <key>`: an account key, or an operator key with"
    " `?account=`.",
)


class Problem(Exception):
    """An error of this contract: ``{"error": {"code": <http status>, "message": ...}}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        body = {"error": {"code": self.status, "message": self.message}}
        return JSONResponse(body, status_code=self.status)


@dataclass(frozen=True, slots=True)
class Period:
    """A named period: the dates the response shows and the instants the query covers."""

    name: str
    start_date: date  # shown as startDate
    end_date: date  # shown as endDate
    start: datetime  # the range counted is [start, end), UTC
    end: datetime

    @property
    def daily(self) -> bool:
        return (self.end - self.start) <= timedelta(days=MAX_DAILY_DAYS)


def _midnight(d: date) -> datetime:
    return datetime.combine(d, time(), UTC)


def period(name: str, today: date, cycle: BillingCycle | None) -> Period:
    """The range a ``timePeriod`` covers on ``today`` (a UTC date).

    Presets (7-days, 30-days, 3-months) run from the first day's 00:00 UTC to the end of
    today, [startDate 00:00, endDate + 1 day 00:00): today is included, so usage sent this
    morning shows this afternoon, and endDate is today. 7-days is thus 8 calendar days,
    today and the 7 before it; 30-days is 31.

    current-billing-cycle is the cycle containing today, [startDate 00:00, endDate 00:00):
    endDate is the start of the next cycle, as in the seed's example (2023-12-27 to
    2024-12-27 for a yearly cycle), so it is exclusive. A cycle anchored on the 31st starts
    on the last day of shorter months (2025-02-28, then 2025-03-31).
    """
    if name == DEFAULT_PERIOD:
        first, following = (cycle or CALENDAR_MONTH).containing(today)
        return Period(name, first, following, _midnight(first), _midnight(following))
    first, last = preset_range(name, today)
    return Period(name, first, last, _midnight(first), _midnight(last + timedelta(days=1)))


def _split(bucket: ResultBucket) -> tuple[int, int]:
    """(app actions, API actions) in a bucket. Only ``source=app`` is an app action; an
    action without a source, or with any other one, is an API action, so count is always
    their sum."""
    app = api = 0
    for group in bucket.groups:
        n = int(group.values[0])
        if group.as_dict().get(SOURCE) == APP:
            app += n
        else:
            api += n
    return app, api


def _entry(day: date, app: int, api: int) -> dict[str, Any]:
    # Key order as in the seed's example.
    return {
        "appActions": app,
        "month": f"{MONTH_NAMES[day.month - 1]}-{day.year % 100:02d}",
        "year": day.year,
        "date": day.isoformat(),
        "apiActions": api,
        "count": app + api,
    }


def entries(buckets: tuple[ResultBucket, ...], daily: bool) -> list[dict[str, Any]]:
    """Day buckets (UTC, in date order) -> one entry per day, or per month, with usage.

    A month's ``date`` is its first day with usage inside the period, which only day
    buckets can tell: the engine is asked per day once and the days are folded here.
    """
    out: list[dict[str, Any]] = []
    month_of: tuple[int, int] | None = None
    for bucket in buckets:
        app, api = _split(bucket)
        if not app + api:
            continue
        day = bucket.start.astimezone(UTC).date()
        if daily or (day.year, day.month) != month_of:
            out.append(_entry(day, app, api))
            month_of = (day.year, day.month)
        else:
            last = out[-1]
            last["appActions"] += app
            last["apiActions"] += api
            last["count"] += app + api
    return out


def _caller(request: Request) -> ApiKey:
    key = authenticate(services(request).store, bearer_secret(request))
    if key is None:
        raise Problem(401, "missing or invalid key: send 'Authorization: bearer <your API key>'")
    return key


def _account(request: Request, key: ApiKey, account: str | None) -> str:
    """The account to report on, once the caller may read it. An account key reads its own
    account by default and, with ``?account=``, any account below it (DESIGN.md: a parent
    sees its children); an operator key must name one."""
    account_id = account or key.account_id
    if not account_id:
        raise Problem(400, "account: an operator key must name the account, add ?account=<id>")
    store = services(request).store
    if not key.is_operator and Scope.READ not in key.scopes:
        raise Problem(403, "this key may not read usage: use a key with the read scope")
    if not can_read(store, key, account_id):
        # The same answer for an account that does not exist and one of another tenant.
        raise Problem(404, f"account {account_id!r} not found, or this key may not read it")
    return account_id


def _report(
    request: Request, time_period: str | None, account: str | None, version: str | None
) -> JSONResponse:
    key = _caller(request)
    errors = []
    if version is None or version.strip() not in API_VERSIONS:
        given = "missing" if version is None else f"{version!r} is not supported"
        errors.append(
            f"x-api-version: {given}; send the header with one of: {', '.join(API_VERSIONS)}"
        )
    name = DEFAULT_PERIOD if time_period is None else time_period
    if name not in TIME_PERIODS:
        errors.append(f"timePeriod: {name!r} is not allowed; use one of: {', '.join(TIME_PERIODS)}")
    if key.is_operator and not account:
        errors.append("account: an operator key must name the account, add ?account=<id>")
    if errors:
        raise Problem(400, "; ".join(errors))
    account_id = _account(request, key, account)

    svc = services(request)
    try:
        cycle = svc.store.get_account(account_id).billing_cycle
    except NotFound:
        raise Problem(
            404, f"account {account_id!r} not found, or this key may not read it"
        ) from None
    today = svc.now().astimezone(UTC).date()
    span = period(name, today, cycle)
    # One query per day, grouped by source, over the account and every account below it.
    result = svc.engine.run(
        UsageQuery(
            accounts=tuple(svc.store.descendants(account_id)),
            metric=METRIC,
            start=span.start,
            end=span.end,
            granularity=Granularity.DAY,
            tz="UTC",
            aggregations=(Aggregation.COUNT,),
            group_by=(SOURCE,),
        )
    )
    body = {
        "data": {
            "startDate": span.start_date.isoformat(),
            "endDate": span.end_date.isoformat(),
            # The seed's example shows 0 here; this is the true total over the period.
            "totalActions": int(result.total[0]),
            "data": entries(result.buckets, span.daily),
            "timePeriod": span.name,
        }
    }
    return JSONResponse(body)


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
        }
    },
}


def _error_doc(description: str, status: int, message: str) -> dict[str, Any]:
    example = {"error": {"code": status, "message": message}}
    return {
        "description": description,
        "content": {"application/json": {"schema": _ERROR_SCHEMA, "example": example}},
    }


_EXAMPLE = {
    "data": {
        "startDate": "2025-02-28",
        "endDate": "2025-03-31",
        "totalActions": 5,
        "data": [
            {
                "appActions": 3,
                "month": "Mar-25",
                "year": 2025,
                "date": "2025-03-02",
                "apiActions": 2,
                "count": 5,
            }
        ],
        "timePeriod": "current-billing-cycle",
    }
}


@router.get(
    PATH,
    tags=["contract: detail usage time"],
    summary="Get Analytics Detailed Usage Time",
    dependencies=[Security(_bearer)],
    responses={
        200: {
            "description": "Actions per day (periods up to 31 days) or per month, with usage.",
            "content": {"application/json": {"example": _EXAMPLE}},
        },
        400: _error_doc(
            "Missing or unsupported x-api-version, unknown timePeriod, or an operator key"
            " without account.",
            400,
            "timePeriod: 'week' is not allowed; use one of: 7-days, 30-days, 3-months,"
            " current-billing-cycle",
        ),
        401: _error_doc(
            "Missing or invalid key.",
            401,
            "missing or invalid key: send 'Authorization: bearer <your API key>'",
        ),
        403: _error_doc(
            "The key has no read scope.",
            403,
            "this key may not read usage: use a key with the read scope",
        ),
        404: _error_doc(
            "The account does not exist, or the key may not read it.",
            404,
            "account 'acme-eu' not found, or this key may not read it",
        ),
    },
)
async def detail_usage_time(
    request: Request,
    time_period: str | None = Query(
        None,
        alias="timePeriod",
        description="7-days, 30-days, 3-months or current-billing-cycle (the default). Presets"
        " end today (UTC) and include it; a billing cycle's endDate is the next cycle's start.",
        examples=["7-days"],
    ),
    account: str | None = Query(
        None,
        description="Account id. Required with an operator key; an account key reads its own"
        " account by default, or one of its subaccounts.",
    ),
    x_api_version: str | None = Header(
        None, description="Required. Supported: 2025-09.", examples=["2025-09"]
    ),
) -> JSONResponse:
    """Actions of an account and its subaccounts over a period: `appActions` (events of
    metric `actions` with `source=app`), `apiActions` (every other action, including those
    without a source) and `count` (both), per day when the period spans at most 31 days and
    per month otherwise. Only days or months with usage are listed, in date order; a month's
    `date` is its first day with usage. Dates are UTC."""
    try:
        return _report(request, time_period, account, x_api_version)
    except Problem as problem:
        return problem.response()
