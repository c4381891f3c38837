"""The native API: events, and the query that exposes the whole engine (accounts and keys:
tenants.py).

Read routes are ``async def``: they run on the event loop's thread, with its one SQLite
connection, because the hop to a worker thread cost more than a typical query. Routes that
write wait for a commit's fsync off the loop: POST /v1/events awaits the SQLite store's
committer thread (see ``_append``), other writes run in the thread pool.
"""

import asyncio
import difflib
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import Any, cast

import msgspec
from fastapi import APIRouter, Query, Request
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute

from usagemeter.api.credentials import bearer_secret, key_from_bearer
from usagemeter.api.params import MAX_FILTERS, MAX_GROUP_BY, MAX_TAGS, ascii_int
from usagemeter.api.responses import ApiError, JSONResponse, number
from usagemeter.api.services import Services, services
from usagemeter.auth import Caller, authenticate, can_read
from usagemeter.engine import Engine
from usagemeter.ingest import BatchRejected, Ingestor, answer
from usagemeter.meters import parse_aggregation
from usagemeter.model import (
    Aggregation,
    ApiKey,
    AppendResult,
    Event,
    Group,
    Result,
    Scope,
)
from usagemeter.model import Query as UsageQuery
from usagemeter.portal import may_read
from usagemeter.store.base import KeyRevoked, NotFound
from usagemeter.timewindows import (
    Granularity,
    isoformat,
    out_of_range,
    parse_instant,
    parse_zone,
)

router = APIRouter()

MAX_BODY = 16 * 1024 * 1024
INLINE_BODY = 8 * 1024  # a body this small is checked on the event loop: cheaper than a thread
MAX_BUCKETS = 10_000
NOT_READABLE = "not found, or this key may not read it"


def caller(request: Request) -> ApiKey:
    key = key_from_bearer(services(request).store, request)
    if key is None:
        raise _unauthorized()
    return key


def _unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "send a valid key as 'Authorization: Bearer <secret>'")


def reader(request: Request) -> ApiKey:
    """The caller, if its key may read at all (which accounts: ``auth.can_read``)."""
    key = caller(request)
    if not key.is_operator and Scope.READ not in key.scopes:
        raise ApiError(403, "forbidden", "this key has no read scope: reading needs one")
    return key


@router.get("/healthz", tags=["service"])
async def healthz(request: Request) -> JSONResponse:
    """``ok``; or 503 ``degraded`` with the reason while the store fails writes (a full disk),
    until a write succeeds again."""
    failure = services(request).ingestor.write_failure
    if failure is not None:
        return JSONResponse({"status": "degraded", "store": failure}, status_code=503)
    return JSONResponse({"status": "ok"})


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
    ``id`` its account has sent before is counted once and reported in ``duplicates``; one
    that came with another payload (metric, ts, value, billable, key, dimensions or tags) is
    also listed in ``conflicting``, and the stored event stays as first received."""
    svc = services(request)
    store = svc.store
    secret = bearer_secret(request)
    if not hasattr(store, "submit"):
        who = Caller(authenticate(store, secret), None, cached=False)
    else:
        # This store checks the key again in the transaction that stores the batch, so a
        # key authenticated before is taken from the cache; any other answer than a
        # stored batch's checks it in the store first (below): a revoked key gets a 401.
        who = svc.keys.authenticate(store, secret)
    try:
        return await _post_events(request, svc, who)
    except KeyRevoked:
        assert who.digest is not None
        svc.keys.forget(who.digest)
        raise _unauthorized() from None
    except Exception:
        if who.cached and authenticate(store, secret) is None:
            assert who.digest is not None
            svc.keys.forget(who.digest)
            raise _unauthorized() from None
        raise


async def _post_events(request: Request, svc: Services, who: Caller) -> JSONResponse:
    key = who.key
    if key is None:
        raise _unauthorized()
    if not key.is_operator and Scope.INGEST not in key.scopes:
        raise ApiError(403, "forbidden", "this key has no ingest scope")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise ApiError(413, "too_large", f"a request body holds at most {MAX_BODY} bytes")
    content_type = request.headers.get("content-type", "")
    ndjson = "ndjson" in content_type or "jsonlines" in content_type
    ingestor = svc.ingestor
    guard = None if who.digest is None else (who.digest, key.id)
    try:
        if len(body) <= INLINE_BODY:
            events = ingestor.validate_json(body, ndjson, key)
        else:
            events = await run_in_threadpool(ingestor.validate_json, body, ndjson, key)
        result = await _append(ingestor, events, guard)
    except BatchRejected as exc:
        errors = [e.as_dict() for e in exc.errors]
        message = f"{len(errors)} event(s) rejected, nothing stored: {exc}"
        raise ApiError(400, "invalid_events", message, {"errors": errors}) from None
    except ValueError as exc:  # not JSON at all
        raise ApiError(400, "invalid_json", str(exc)) from None
    return JSONResponse(answer(result, events))


def events_route() -> BaseRoute:
    """The route of ``POST /v1/events`` (``fastroute.FastRoute`` answers it first)."""
    for route in router.routes:
        if isinstance(route, APIRoute) and route.endpoint is post_events:
            return route
    raise LookupError("POST /v1/events is not routed")


async def _append(
    ingestor: Ingestor, events: list[Event], key: tuple[bytes, str] | None
) -> AppendResult:
    """A store that commits queued batches on a thread of its own (SQLite's ``submit``) is
    awaited on the event loop; any other store's ``append`` waits in the thread pool. The
    hop to a pool thread and back was a large part of a one-event request's time. ``key``:
    the (secret hash, key id) the batch must still be sent under at its commit."""
    store = ingestor.store
    submit = getattr(store, "submit", None)
    with ingestor.writing(events) as write:
        if submit is None:
            write.result = await run_in_threadpool(store.append, events)
        else:
            write.result = await asyncio.wrap_future(submit(events, key))
    assert write.result is not None  # writing() raised otherwise
    return write.result


# --------------------------------------------------------------------- query


def refuse_unknown_params(request: Request, known: frozenset[str]) -> None:
    """A 400 naming every parameter the route does not take, each with the closest one it
    does: a misspelled ``granularty=hour`` must not quietly answer per day."""
    unknown = sorted(set(request.query_params) - known)
    if not unknown:
        return
    errors = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        errors.append({"param": name, "message": f"unknown parameter{hint}"})
    message = "; ".join(f"{e['param']}: {e['message']}" for e in errors)
    raise ApiError(
        400,
        "unknown_parameter",
        f"{message} (known: {', '.join(sorted(known))})",
        {"errors": errors},
    )


def query_json(result: Result) -> dict[str, Any]:
    """The native rendering of a Result: one value per group per bucket (the first
    aggregation's), and all aggregations under ``values`` when several were asked.

    An answer cut short by ``limit`` says so: ``truncated`` is true and ``next_start`` is
    where the next page starts (ask again with ``start`` set to it); its totals cover the
    buckets returned."""
    return _answer(result, _bucket_dicts(result))


def query_answer(result: Result) -> dict[str, Any]:
    """query_json's answer for the response, its buckets already written as JSON
    (``buckets_json``): msgspec writes the same bytes for it as for query_json's, without a
    dict per cell and bucket. Only msgspec encodes it (the CLI's json.dumps takes
    query_json's)."""
    return _answer(result, msgspec.Raw(buckets_json(result)))


def _answer(result: Result, buckets: object) -> dict[str, Any]:
    query = result.query
    cells = result.cells
    last_end = cells.cuts[-1] if len(cells) else query.end
    truncated = query.limit is not None and last_end < query.end
    shown: dict[Group, dict[str, str | None]] = {}
    return {
        "metric": query.metric,
        "aggregation": ",".join(a.value for a in result.aggregations),
        "accounts": list(query.accounts),
        "start": isoformat(query.start),
        "end": isoformat(query.end),
        "granularity": query.granularity.value,
        "tz": query.tz,
        "group_by": list(query.group_by),
        "buckets": buckets,
        "totals": [
            _cell(result, shown.setdefault(g.group, dict(g.group)), g.values) for g in result.totals
        ],
        "total": number(result.total[0]),
        "truncated": truncated,
        "next_start": isoformat(last_end) if truncated else None,
    }


def _cell(
    result: Result, group: dict[str, str | None], values: tuple[float, ...]
) -> dict[str, Any]:
    out: dict[str, Any] = {"group": group, "value": number(values[0])}
    if len(result.aggregations) > 1:
        out["values"] = {
            a.value: number(v) for a, v in zip(result.aggregations, values, strict=True)
        }
    return out


def _bucket_dicts(result: Result) -> list[dict[str, Any]]:
    """The answer's buckets as lists and dicts, from its columns (model.BucketCells)."""
    cells = result.cells
    # Each group's dict made once and shared by its cells (an hourly report by status has
    # thousands of cells and a handful of groups); the encoder writes it out each time.
    shown = [dict(group) for group in cells.groups]
    rendered = [
        _cell(result, shown[group], values)
        for group, values in zip(cells.group_of, cells.values, strict=True)
    ]
    stamps = list(map(isoformat, cells.cuts))  # a bucket's end is the next one's start
    return [
        {"start": start, "end": end, "groups": rendered[lo:hi]}
        for start, end, lo, hi in zip(
            stamps[:-1], stamps[1:], cells.bounds[:-1], cells.bounds[1:], strict=True
        )
    ]


def buckets_json(result: Result) -> bytes:
    """The answer's buckets written as JSON from its columns, the bytes msgspec writes for
    ``_bucket_dicts``: each group's opening and each distinct value encoded once, a
    cell's text their concatenation, a bucket's the join of its run of cells, all by C loops
    (an hourly report by status has about 10,800 cells, 2,160 buckets, a few groups and a few
    hundred distinct counts)."""
    if len(result.aggregations) > 1:
        # Each cell names every aggregation's value too: written from the dicts (rarer).
        return msgspec.json.encode(_bucket_dicts(result))
    cells = result.cells
    encode = msgspec.json.encode
    opening = [b'{"group":' + encode(dict(group)) + b',"value":' for group in cells.groups]
    firsts = list(map(itemgetter(0), cells.values))
    distinct = list(dict.fromkeys(firsts))  # 3 and 3.0 are one key: number() writes both 3
    # One array of the distinct values, split at its commas (a number has none).
    written = encode(list(map(number, distinct)))[1:-1].split(b",")
    closing = dict(zip(distinct, [text + b"}" for text in written], strict=False))
    texts = list(
        map(
            bytes.__add__,
            map(opening.__getitem__, cells.group_of),
            map(closing.__getitem__, firsts),
        )
    )
    runs = map(b",".join, map(texts.__getitem__, map(slice, cells.bounds, cells.bounds[1:])))
    stamps = _kept_stamps(cells.cuts)
    parts = zip(
        repeat(b'{"start":'),
        stamps,
        repeat(b',"end":'),
        stamps[1:],
        repeat(b',"groups":['),
        runs,
        repeat(b"]}"),
    )
    return b"[" + b",".join(map(b"".join, parts)) + b"]"


def _stamps(cuts: Sequence[datetime]) -> list[bytes]:
    """Each boundary's text as isoformat writes it, quoted, once. msgspec writes the same text
    for an instant of whole seconds at an offset of whole minutes, 30 times as fast as one
    isoformat per boundary (an hourly report has 2,161): it writes microseconds where
    isoformat writes milliseconds, and rounds an offset's seconds (a zone's local mean
    time, +00:19:32) to its minutes, so any other list is written one boundary at a time."""
    if not cuts:
        return []
    if any(map(attrgetter("microsecond"), cuts)) or any(
        offset.seconds % 60 for offset in set(map(_utcoffset, cuts))
    ):
        return [msgspec.json.encode(isoformat(t)) for t in cuts]
    return msgspec.json.encode(cuts)[1:-1].split(b",")  # an instant's text has no comma


_utcoffset = cast("Callable[[datetime], timedelta]", datetime.utcoffset)

# The boundaries' texts of the last answers' cuts, by the very tuple: the engine keeps a
# recent range's cuts (engine._kept_cuts), and an hourly report's 2,161 took 0.5 ms of its
# response's 3 (round 14). Each entry holds its tuple, so no other tuple can take its id.
STAMPS_KEPT = 16
_stamps_kept: dict[int, tuple[Sequence[datetime], list[bytes]]] = {}


def _kept_stamps(cuts: Sequence[datetime]) -> list[bytes]:
    if not isinstance(cuts, tuple):  # a list may change: written each time
        return _stamps(cuts)
    kept = _stamps_kept.get(id(cuts))
    if kept is not None and kept[0] is cuts:
        return kept[1]
    stamps = _stamps(cuts)
    if len(_stamps_kept) >= STAMPS_KEPT:
        _stamps_kept.clear()  # a bound on memory: written again when asked
    _stamps_kept[id(cuts)] = (cuts, stamps)
    return stamps


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

    def instant(name: str, text: str) -> datetime | None:
        try:
            t = parse_instant(text, zone or parse_zone("UTC"))
        except ValueError as exc:
            fail(name, str(exc))
            return None
        outside = out_of_range(t)
        if outside:
            fail(name, outside)
            return None
        return t

    # A bad end or start has been reported; "now" stands in so the other checks still run.
    end = (instant("end", params["end"]) if params["end"] else None) or now
    start = (instant("start", params["start"]) if params["start"] else None) or (
        end - timedelta(days=30)
    )
    if start >= end and not any(e["param"] in ("start", "end") for e in errors):
        fail("start", "must be before end")
    try:
        granularity = Granularity(params["granularity"] or "day")
    except ValueError:
        granularity = Granularity.DAY
        fail("granularity", "use hour, day, month or total")
    group_by = tuple(g.strip() for g in (params["group_by"] or "").split(",") if g.strip())
    if len(group_by) > MAX_GROUP_BY:
        fail("group_by", f"at most {MAX_GROUP_BY} dimensions, got {len(group_by)}")
    if len(params["filter"] or []) > MAX_FILTERS:
        fail("filter", f"at most {MAX_FILTERS} filter parameters, got {len(params['filter'])}")
        params = {**params, "filter": []}
    filters: list[tuple[str, str]] = []
    for item in params["filter"] or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail("filter", f"{item!r}: use dimension=value, e.g. filter=source=app")
        else:
            filters.append((name, value))
    tags = frozenset(t.strip() for t in (params["tags"] or "").split(",") if t.strip())
    if len(tags) > MAX_TAGS:
        fail("tags", f"at most {MAX_TAGS} tags, got {len(tags)}")
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
        limit = ascii_int(params["limit"])
        if limit is None or not 1 <= limit <= MAX_BUCKETS:
            fail("limit", f"a whole number from 1 to {MAX_BUCKETS}")
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


# At most as short as each granularity's bucket can be, to bound a range's bucket count before
# computing any: a local hour lasts 30 minutes when Lord Howe's clocks skip half an hour, a
# day 22 hours under a two-hour jump (double summer time), a February 28 days less an hour.
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
    limit: str | None = Query(
        None,
        description="At most this many buckets, the earliest first; a cut answer says"
        " truncated: true and next_start.",
    ),
    include_subaccounts: bool = Query(True, description="Count the account's descendants too."),
) -> JSONResponse:
    """Usage of one metric over a range: zone-aligned buckets with a value per group, and
    totals. This is the engine's whole surface; the dashboard and the CLI use it."""
    refuse_unknown_params(request, QUERY_PARAMS)
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
    query = build_query(request, reader(request), params, svc)
    try:
        result = svc.engine.run(query)
    except ValueError as exc:
        raise ApiError(400, "invalid_query", str(exc)) from None
    answer = query_answer(result)
    # An answer of zeros for a metric never recorded is most often a misspelled metric.
    seen = bool(result.cells.group_of) or bool(
        svc.store.metrics_seen(query.accounts, query.metric, dimensions=False)
    )
    answer["metric_seen"] = seen
    if not seen:
        answer["notice"] = (
            f"no {query.metric!r} event was ever recorded for these accounts;"
            " GET /v1/metrics lists the metrics that were"
        )
    return JSONResponse(answer)


QUERY_PARAMS = frozenset(
    {
        "metric",
        "account",
        "start",
        "end",
        "granularity",
        "tz",
        "group_by",
        "filter",
        "tags",
        "billable",
        "key",
        "aggregation",
        "limit",
        "include_subaccounts",
    }
)


@router.get("/v1/metrics", tags=["query"])
async def list_metrics(
    request: Request,
    account: str | None = Query(
        None, description="Account id; an account key defaults to its own."
    ),
    include_subaccounts: bool = Query(True, description="Count the account's descendants too."),
) -> JSONResponse:
    """The metrics the account has events for (any time), each with its meter and the
    dimension names its events carry: what ``/v1/query`` can be asked about."""
    refuse_unknown_params(request, frozenset({"account", "include_subaccounts"}))
    key = caller(request)
    svc = services(request)
    account_id = account or key.account_id
    if not account_id:
        raise ApiError(
            400,
            "invalid_query",
            "account: required with an operator key: the account to list the metrics of",
            {"errors": [{"param": "account", "message": "required with an operator key"}]},
        )
    if not can_read(svc.store, key, account_id):
        raise ApiError(404, "not_found", f"account {account_id!r} {NOT_READABLE}")
    accounts = svc.store.descendants(account_id) if include_subaccounts else [account_id]
    seen = svc.store.metrics_seen(accounts)
    seen = {name: dims for name, dims in seen.items() if may_read(name)}  # portal tokens
    metrics = []
    for name in sorted(seen):
        meter = svc.engine.meters.get(name)
        aggregation = meter.aggregation.value
        if meter.dimension is not None:
            aggregation = f"{aggregation}({meter.dimension})"
        metrics.append({"metric": name, "meter": aggregation, "dimensions": seen[name]})
    return JSONResponse({"account": account_id, "accounts": accounts, "metrics": metrics})
