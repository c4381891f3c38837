"""The native API: accounts, keys, events and the query that exposes the whole engine.

Read routes are ``async def``: they run on the event loop's thread, with its one SQLite
connection, because the hop to a worker thread cost more than a typical query. Routes that
write wait for a commit's fsync, so they run in the thread pool (``run_in_threadpool``).
"""

import secrets
from dataclasses import replace
from datetime import date, datetime, timedelta
from typing import Any

import msgspec
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from usagemeter.api.credentials import key_from_bearer
from usagemeter.api.openapi import standalone_schema
from usagemeter.api.responses import ApiError, JSONResponse, number
from usagemeter.api.services import Services, services
from usagemeter.auth import KEY_ID_PATTERN, can_read, can_see_key, issue_key
from usagemeter.engine import Engine
from usagemeter.ingest import BatchRejected
from usagemeter.meters import parse_aggregation
from usagemeter.model import Account, Aggregation, ApiKey, Result, Scope
from usagemeter.model import Query as UsageQuery
from usagemeter.store.base import Conflict, NotFound
from usagemeter.timewindows import BillingCycle, Granularity, isoformat, parse_instant, parse_zone

router = APIRouter()

MAX_BODY = 16 * 1024 * 1024
MAX_BUCKETS = 10_000
NOT_READABLE = "not found, or this key may not read it"


def caller(request: Request) -> ApiKey:
    key = key_from_bearer(services(request).store, request)
    if key is None:
        raise ApiError(401, "unauthorized", "send a valid key as 'Authorization: Bearer <secret>'")
    return key


def operator(request: Request) -> ApiKey:
    key = caller(request)
    if not key.is_operator:
        raise ApiError(403, "forbidden", "this needs an operator key")
    return key


def key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "account_id": key.account_id,
        "name": key.name,
        "prefix": key.prefix,
        "scopes": sorted(s.value for s in key.scopes),
        "created_at": isoformat(key.created_at),
        "revoked_at": isoformat(key.revoked_at) if key.revoked_at else None,
    }


def account_json(account: Account) -> dict[str, Any]:
    cycle = account.billing_cycle
    return {
        "id": account.id,
        "name": account.name,
        "parent_id": account.parent_id,
        "billing_cycle": (
            {"anchor": cycle.anchor.isoformat(), "period": cycle.period} if cycle else None
        ),
        "created_at": isoformat(account.created_at) if account.created_at else None,
    }


def _decode(model: type[Any], body: bytes) -> Any:
    try:
        return msgspec.json.decode(body or b"{}", type=model)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_body", f"request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None


def _body_doc(model: type[Any], example: Any) -> dict[str, Any]:
    """OpenAPI for a body we decode ourselves (to answer in our own error envelope)."""
    schema = standalone_schema(model)
    content = {"application/json": {"schema": schema, "example": example}}
    return {"requestBody": {"required": True, "content": content}}


@router.get("/healthz", tags=["service"])
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


# ------------------------------------------------------------------ accounts


class BillingCycleIn(msgspec.Struct, forbid_unknown_fields=True):
    anchor: str
    period: str = "month"


class AccountIn(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    id: str | None = None
    parent_id: str | None = None
    billing_cycle: BillingCycleIn | None = None


@router.post(
    "/v1/accounts",
    status_code=201,
    tags=["accounts"],
    openapi_extra=_body_doc(
        AccountIn, {"name": "Acme", "billing_cycle": {"anchor": "2025-01-31", "period": "month"}}
    ),
)
async def create_account(request: Request) -> JSONResponse:
    """Create an account (operator key). ``id`` is optional: your own customer id, or one is
    made. ``parent_id`` makes it a subaccount; the parent then sees its usage."""
    operator(request)
    data: AccountIn = _decode(AccountIn, await request.body())
    errors = []
    if not data.name.strip():
        errors.append("name: must not be empty")
    if data.id is not None and not KEY_ID_PATTERN.match(data.id):
        errors.append("id: 1 to 64 letters, digits, '_' or '-'")
    cycle = None
    if data.billing_cycle is not None:
        try:
            cycle = BillingCycle(
                date.fromisoformat(data.billing_cycle.anchor), data.billing_cycle.period
            )
        except ValueError as exc:
            errors.append(f"billing_cycle: {exc} (anchor YYYY-MM-DD, period month or year)")
    if errors:
        raise ApiError(400, "invalid_account", "; ".join(errors), {"errors": errors})
    account = Account(
        id=data.id or "acct_" + secrets.token_hex(8),
        name=data.name.strip(),
        parent_id=data.parent_id,
        billing_cycle=cycle,
    )
    try:
        created = await run_in_threadpool(services(request).store.create_account, account)
    except NotFound:
        message = f"parent_id: account {data.parent_id!r} does not exist"
        raise ApiError(400, "invalid_account", message) from None
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return JSONResponse(account_json(created), status_code=201)


@router.get("/v1/accounts", tags=["accounts"])
async def list_accounts(request: Request) -> JSONResponse:
    """Every account (operator), or the caller's own account and its descendants."""
    key = caller(request)
    store = services(request).store
    if key.is_operator:
        accounts = store.list_accounts()
    else:
        assert key.account_id is not None
        readable = set(store.descendants(key.account_id))
        accounts = [a for a in store.list_accounts() if a.id in readable]
    return JSONResponse({"data": [account_json(a) for a in accounts]})


def readable_account(request: Request, key: ApiKey, account_id: str) -> Account:
    store = services(request).store
    if not can_read(store, key, account_id):
        raise ApiError(404, "not_found", f"account {account_id!r} {NOT_READABLE}")
    return store.get_account(account_id)


@router.get("/v1/accounts/{account_id}", tags=["accounts"])
async def get_account(request: Request, account_id: str) -> JSONResponse:
    return JSONResponse(account_json(readable_account(request, caller(request), account_id)))


# ---------------------------------------------------------------------- keys


class KeyIn(msgspec.Struct, forbid_unknown_fields=True):
    name: str = ""
    prefix: str = "um_"
    id: str | None = None
    scopes: list[str] = msgspec.field(default_factory=lambda: ["read"])


@router.post(
    "/v1/accounts/{account_id}/keys",
    status_code=201,
    tags=["keys"],
    openapi_extra=_body_doc(KeyIn, {"name": "production", "prefix": "ak_"}),
)
async def create_key(request: Request, account_id: str) -> JSONResponse:
    """Create a key for an account (operator, or a key of that account). The response's
    ``key`` is the secret: it is shown here once and never again."""
    key = caller(request)
    if not key.is_operator and key.account_id != account_id:
        raise ApiError(404, "not_found", f"account {account_id!r} {NOT_READABLE}")
    data: KeyIn = _decode(KeyIn, await request.body())
    try:
        scopes = [Scope(s) for s in data.scopes]
    except ValueError:
        raise ApiError(400, "invalid_key", "scopes: use 'read' and/or 'ingest'") from None
    if Scope.OPERATOR in scopes or not scopes:
        raise ApiError(400, "invalid_key", "scopes: use 'read' and/or 'ingest'")
    store = services(request).store
    if not can_read(store, key, account_id) and not key.is_operator:
        raise ApiError(404, "not_found", f"account {account_id!r} {NOT_READABLE}")
    try:
        created, secret = await run_in_threadpool(
            lambda: issue_key(
                store, account_id, name=data.name, prefix=data.prefix, scopes=scopes, key_id=data.id
            )
        )
    except NotFound:
        raise ApiError(404, "not_found", f"account {account_id!r} {NOT_READABLE}") from None
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, "invalid_key", str(exc)) from None
    return JSONResponse({**key_json(created), "key": secret}, status_code=201)


@router.get("/v1/accounts/{account_id}/keys", tags=["keys"])
async def list_keys(request: Request, account_id: str) -> JSONResponse:
    """The account's keys, without secrets."""
    readable_account(request, caller(request), account_id)
    keys = services(request).store.list_keys(account_id)
    return JSONResponse({"data": [key_json(k) for k in keys]})


@router.delete("/v1/keys/{key_id}", tags=["keys"])
def revoke_key(request: Request, key_id: str) -> JSONResponse:
    """Revoke a key: it stops working at once. Revoking twice is harmless."""
    key = caller(request)
    store = services(request).store
    try:
        target = store.get_key(key_id)
    except NotFound:
        target = None
    if target is None or not can_see_key(store, key, target):
        raise ApiError(404, "not_found", f"key {key_id!r} {NOT_READABLE}")
    return JSONResponse(key_json(store.revoke_key(key_id)))


# -------------------------------------------------------------------- events

EVENTS_EXAMPLE = [
    {
        "id": "evt_0001",
        "account": "acme",
        "metric": "lookups",
        "ts": "2025-01-31T12:00:00Z",
        "value": 1,
        "dimensions": {"licensee": "sl_1"},
        "tags": ["foo"],
    }
]


@router.post(
    "/v1/events",
    tags=["events"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "array"}, "example": EVENTS_EXAMPLE},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
)
async def post_events(request: Request) -> JSONResponse:
    """Record usage events (operator key: any account; ingest key: its own account). The
    batch is stored whole or not at all; the reply comes after it is on disk. An event whose
    ``id`` its account has sent before is counted once and reported in ``duplicates``."""
    key = caller(request)
    if not key.is_operator and Scope.INGEST not in key.scopes:
        raise ApiError(403, "forbidden", "this key has no ingest scope")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise ApiError(413, "too_large", f"a request body holds at most {MAX_BODY} bytes")
    content_type = request.headers.get("content-type", "")
    ndjson = "ndjson" in content_type or "jsonlines" in content_type
    ingestor = services(request).ingestor
    try:
        result = await run_in_threadpool(ingestor.ingest_json, body, ndjson, key)
    except BatchRejected as exc:
        errors = [e.as_dict() for e in exc.errors]
        message = f"{len(errors)} event(s) rejected, nothing stored: {exc}"
        raise ApiError(400, "invalid_events", message, {"errors": errors}) from None
    except ValueError as exc:  # not JSON at all
        raise ApiError(400, "invalid_json", str(exc)) from None
    return JSONResponse({"accepted": result.accepted, "duplicates": result.duplicates})


# --------------------------------------------------------------------- query


def query_json(result: Result) -> dict[str, Any]:
    """The native rendering of a Result: one value per group per bucket (the first
    aggregation's), and all aggregations under ``values`` when several were asked."""
    query = result.query
    several = len(result.aggregations) > 1

    def values(group: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"group": group.as_dict(), "value": number(group.values[0])}
        if several:
            out["values"] = {
                a.value: number(v) for a, v in zip(result.aggregations, group.values, strict=True)
            }
        return out

    stamps: dict[tuple[int, datetime], str] = {}

    def stamp(t: datetime) -> str:
        # A bucket's end is the next one's start: format it once. The fold is part of the
        # key because datetimes in one zone compare by wall clock: New York's two 01:00s
        # on 2024-11-03 are equal as datetimes and differ only in fold (and offset).
        text = stamps.get((t.fold, t))
        if text is None:
            text = stamps[(t.fold, t)] = isoformat(t)
        return text

    return {
        "metric": query.metric,
        "aggregation": ",".join(a.value for a in result.aggregations),
        "accounts": list(query.accounts),
        "start": isoformat(query.start),
        "end": isoformat(query.end),
        "granularity": query.granularity.value,
        "tz": query.tz,
        "group_by": list(query.group_by),
        "buckets": [
            {
                "start": stamp(b.start),
                "end": stamp(b.end),
                "groups": [values(g) for g in b.groups],
            }
            for b in result.buckets
        ],
        "totals": [values(g) for g in result.totals],
        "total": number(result.total[0]),
    }


def build_query(request: Request, key: ApiKey, params: dict[str, Any], svc: Services) -> UsageQuery:
    """Every problem with the parameters at once, or the Query."""
    errors: list[dict[str, str]] = []

    def fail(param: str, message: str) -> None:
        errors.append({"param": param, "message": message})

    metric = params["metric"]
    if not metric:
        fail("metric", "required: the metric to report, e.g. lookups")
    account_id = params["account"] or key.account_id
    if not account_id:
        fail("account", "required with an operator key: the account to report on")
    tz = params["tz"] or "UTC"
    zone = None
    try:
        zone = parse_zone(tz)
    except ValueError as exc:
        fail("tz", str(exc))
    now = svc.now()
    end = start = now
    try:
        end = parse_instant(params["end"], zone or parse_zone("UTC")) if params["end"] else now
    except ValueError as exc:
        fail("end", str(exc))
    try:
        start = (
            parse_instant(params["start"], zone or parse_zone("UTC"))
            if params["start"]
            else end - timedelta(days=30)
        )
    except ValueError as exc:
        fail("start", str(exc))
    if start >= end and not any(e["param"] in ("start", "end") for e in errors):
        fail("start", "must be before end")
    try:
        granularity = Granularity(params["granularity"] or "day")
    except ValueError:
        granularity = Granularity.DAY
        fail("granularity", "use hour, day, month or total")
    group_by = tuple(g.strip() for g in (params["group_by"] or "").split(",") if g.strip())
    filters: list[tuple[str, str]] = []
    for item in params["filter"] or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail("filter", f"{item!r}: use dimension=value, e.g. filter=source=app")
        else:
            filters.append((name, value))
    tags = frozenset(t.strip() for t in (params["tags"] or "").split(",") if t.strip())
    billable: bool | None = None
    if params["billable"] is not None:
        if params["billable"].lower() not in ("true", "false"):
            fail("billable", "use true or false")
        billable = params["billable"].lower() == "true"
    aggregations: tuple[Aggregation, ...] = ()
    if params["aggregation"]:
        try:
            aggregation, dimension = parse_aggregation(params["aggregation"])
            aggregations = (aggregation,)
            meter = svc.engine.meters.get(metric or "")
            if dimension is not None and meter.dimension != dimension:
                fail("aggregation", f"metric {metric!r} counts distinct {meter.dimension!r} only")
        except ValueError as exc:
            fail("aggregation", str(exc))
    limit = None
    if params["limit"] is not None:
        if not params["limit"].isdigit() or not 1 <= int(params["limit"]) <= MAX_BUCKETS:
            fail("limit", f"a whole number from 1 to {MAX_BUCKETS}")
        else:
            limit = int(params["limit"])
    if errors:
        message = "; ".join(f"{e['param']}: {e['message']}" for e in errors)
        raise ApiError(400, "invalid_query", message, {"errors": errors})

    store = svc.store
    assert account_id is not None
    if not can_read(store, key, account_id):
        raise ApiError(404, "not_found", f"account {account_id!r} {NOT_READABLE}")
    accounts = (
        tuple(store.descendants(account_id)) if params["include_subaccounts"] else (account_id,)
    )
    key_id = params["key"]
    if key_id is not None:
        try:
            owner = store.get_key(key_id).account_id
        except NotFound:
            owner = None
        if owner not in accounts:
            raise ApiError(404, "not_found", f"key {key_id!r} {NOT_READABLE}")
    query = UsageQuery(
        accounts=accounts,
        metric=metric,
        start=start,
        end=end,
        granularity=granularity,
        tz=tz,
        aggregations=aggregations,
        group_by=group_by,
        filters=tuple(filters),
        tags=tags,
        billable=billable,
        key_id=key_id,
        limit=limit,
    )
    if limit is None and _too_many_buckets(query, svc.engine):
        raise ApiError(
            400,
            "too_many_buckets",
            f"more than {MAX_BUCKETS} buckets: use a coarser granularity, a shorter range or limit",
        )
    return query


# The shortest each granularity's bucket can be, to bound a range's bucket count before
# computing any: an hour can shrink to 45 minutes (Lord Howe's half-hour DST aside, a 1-hour
# jump removes one bucket, never shortens one), a day to 23 hours, a month to 28 days.
_SHORTEST = {
    Granularity.HOUR: timedelta(minutes=30),
    Granularity.DAY: timedelta(hours=22),
    Granularity.MONTH: timedelta(days=27),
}


def _too_many_buckets(query: UsageQuery, engine: Engine) -> bool:
    shortest = _SHORTEST.get(query.granularity)
    if shortest is None:  # total: one bucket
        return False
    if (query.end - query.start) / shortest <= MAX_BUCKETS:
        return False  # cheap and certain: even all-shortest buckets would fit
    return len(engine.buckets(replace(query, limit=MAX_BUCKETS + 1))) > MAX_BUCKETS


@router.get("/v1/query", tags=["query"])
async def query_usage(
    request: Request,
    metric: str = Query("", description="Metric to report, e.g. lookups."),
    account: str | None = Query(
        None, description="Account id; an account key defaults to its own."
    ),
    start: str | None = Query(
        None, description="RFC 3339, a date, or epoch ms. Default: end - 30 days."
    ),
    end: str | None = Query(
        None, description="RFC 3339, a date, or epoch ms (exclusive). Default: now."
    ),
    granularity: str | None = Query(None, description="hour, day (default), month or total."),
    tz: str | None = Query(None, description="IANA zone for bucket boundaries (default UTC)."),
    group_by: str | None = Query(
        None, description="Comma-separated dimensions, or key, subaccount."
    ),
    filter: list[str] | None = Query(
        None, description="dimension=value; repeatable; all must hold."
    ),
    tags: str | None = Query(
        None, description="Comma-separated tags; counts events with all of them."
    ),
    billable: str | None = Query(None, description="true or false; default both."),
    key: str | None = Query(None, description="Only events that name this key id."),
    aggregation: str | None = Query(
        None, description="Override the meter: sum, count, max, min, latest."
    ),
    limit: str | None = Query(None, description="At most this many buckets, the earliest first."),
    include_subaccounts: bool = Query(True, description="Count the account's descendants too."),
) -> JSONResponse:
    """Usage of one metric over a range: zone-aligned buckets with a value per group, and
    totals. This is the engine's whole surface; the dashboard and the CLI use it."""
    svc = services(request)
    params = {
        "metric": metric,
        "account": account,
        "start": start,
        "end": end,
        "granularity": granularity,
        "tz": tz,
        "group_by": group_by,
        "filter": filter,
        "tags": tags,
        "billable": billable,
        "key": key,
        "aggregation": aggregation,
        "limit": limit,
        "include_subaccounts": include_subaccounts,
    }
    query = build_query(request, caller(request), params, svc)
    try:
        result = svc.engine.run(query)
    except ValueError as exc:
        raise ApiError(400, "invalid_query", str(exc)) from None
    return JSONResponse(query_json(result))
