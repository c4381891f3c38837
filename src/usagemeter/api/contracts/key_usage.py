"""GET /keys/{key}/usage: the paid lookups made with one key, per UTC day, over a range of at
most 90 days given in UNIX milliseconds.

The contract is seed 001 (issue #4). Its shape, parameter names and defaults are the seed's;
where the seed is silent the decisions are commented beside the code that makes them.

The path may hold a key's full secret instead of its public id. Nothing here logs the path,
and an unexpected error is logged under the route's template, never the raw path.
"""

from __future__ import annotations

import hmac
import logging
import re
from datetime import UTC
from typing import Any

from fastapi import APIRouter, Path, Query, Request, Security
from fastapi.security import HTTPBearer

from usagemeter.api.credentials import bearer_secret
from usagemeter.api.responses import JSONResponse
from usagemeter.api.services import services
from usagemeter.auth import authenticate, can_see_key, hash_secret
from usagemeter.ingest import MAX_TS_MS, MIN_TS_MS
from usagemeter.model import ApiKey, Scope
from usagemeter.model import Query as UsageQuery
from usagemeter.store.base import NotFound, Store, UnstorableText
from usagemeter.store.rows import LOOKUP_BYTES
from usagemeter.timewindows import Granularity, from_ms, isoformat, to_ms

router = APIRouter()
log = logging.getLogger("usagemeter")

PATH = "/keys/{key}/usage"
METRIC = "lookups"
LICENSEE = "licensee"  # the dimension that names a licensee
DEFAULT_DAYS = 21
MAX_RANGE_MS = 90 * 24 * 60 * 60 * 1000
# Optional sign and digits only: "1.5", "1e3" and dates are not UNIX milliseconds.
_INTEGER = re.compile(r"[+-]?\d{1,20}", re.ASCII)
_NOT_VISIBLE = "key not found, or this credential may not see it"

_bearer = HTTPBearer(
    auto_error=False,  # a missing key is answered here, in this contract's envelope
    scheme_name="bearer",
    description="`Authorization: Bearer <secret>`, or `?user_token=<secret>`: a key of the"
    " key's account or of an account above it, or an operator key.",
)


class Problem(Exception):
    """An error of this contract: ``{"code": <4 digits>, "message": ...}``, where the code is
    the HTTP status followed by a digit (seed 001 shows 2000 for success)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        body = {"code": self.status * 10, "message": self.message}
        return JSONResponse(body, status_code=self.status)


def _caller(store: Store, request: Request, user_token: str | None) -> ApiKey:
    # The header wins when both are sent; the query parameter is for clients that cannot
    # set headers (the seed's user_token).
    secret = bearer_secret(request) or (user_token.strip() if user_token else None)
    if not secret:
        raise Problem(
            401, "no credential: send 'Authorization: Bearer <secret>' or ?user_token=<secret>"
        )
    key = authenticate(store, secret)
    if key is None:
        raise Problem(
            401, "the credential is not a valid key (unknown or revoked): send a live one"
        )
    return key


def _target(store: Store, ref: str) -> ApiKey | None:
    """The key a path names: by public id, else by its full secret. A revoked key still has
    usage to report, so unlike ``authenticate`` this accepts one."""
    try:
        return store.get_key(ref)
    except (NotFound, UnstorableText):  # no id holds a NUL: PostgreSQL refuses to look
        pass
    digest = hash_secret(ref)
    for key, stored in store.find_keys_by_lookup(digest[:LOOKUP_BYTES]):
        if hmac.compare_digest(digest, stored):
            return key
    return None


def _millis(name: str, raw: str | None, errors: list[str]) -> int | None:
    if raw is None:
        return None
    text = raw.strip()
    shown = repr(raw if len(raw) <= 40 else raw[:40] + "...")
    if not _INTEGER.fullmatch(text):
        errors.append(
            f"{name}: {shown} is not an integer; send a UNIX timestamp in milliseconds,"
            " e.g. 1418556452651"
        )
        return None
    value = int(text)
    # The range events may carry (ingest rejects others), which also keeps dates in range.
    if not MIN_TS_MS <= value < MAX_TS_MS:
        errors.append(
            f"{name}: {value} is outside 1970-2199; send milliseconds, e.g. 1418556452651"
        )
        return None
    return value


def _range(now_ms: int, start: str | None, end: str | None) -> tuple[int, int]:
    """``(start, end)`` in epoch ms, both inclusive, or Problem(400) listing every error."""
    errors: list[str] = []
    start_ms = _millis("start", start, errors)
    end_ms = _millis("end", end, errors)
    if errors:
        raise Problem(400, "; ".join(errors))
    # Seed 001: "If no start time is provided, the start time will be set to 21 days prior
    # to the current time" -- the current time, not the end given.
    if start_ms is None:
        start_ms = now_ms - DEFAULT_DAYS * 24 * 60 * 60 * 1000
    if end_ms is None:
        end_ms = now_ms
    if start_ms > end_ms:
        hint = ""
        if start is None:
            hint = f" (start defaults to {DEFAULT_DAYS} days before now: send a start)"
        elif end is None:
            hint = " (end defaults to now: send an end)"
        raise Problem(
            400,
            f"start ({start_ms}) is after end ({end_ms}){hint}; start must not be after end",
        )
    if end_ms - start_ms > MAX_RANGE_MS:
        raise Problem(
            400,
            f"the range from start ({start_ms}) to end ({end_ms}) is longer than 90 days;"
            f" end - start may be at most {MAX_RANGE_MS} ms: narrow it",
        )
    return start_ms, end_ms


def _report(
    request: Request,
    key: str,
    start: str | None,
    end: str | None,
    tags: str | None,
    licensee: str | None,
    user_token: str | None,
) -> JSONResponse:
    svc = services(request)
    store = svc.store
    caller = _caller(store, request, user_token)
    start_ms, end_ms = _range(to_ms(svc.now()), start, end)
    if licensee is not None and not licensee.strip():
        # An empty value is more likely a client bug than a wish to count every licensee.
        raise Problem(400, "licensee: must not be empty; omit it to count every licensee")
    if not caller.is_operator and Scope.READ not in caller.scopes:
        raise Problem(403, "this key may not read usage: use a key with the read scope")
    target = _target(store, key.strip())
    if target is None or target.account_id is None:
        # An operator key belongs to no account and no event can name it: nothing to report.
        raise Problem(404, _NOT_VISIBLE)
    if not can_see_key(store, caller, target):
        # The same answer as for a key that does not exist: another tenant's keys stay unseen.
        raise Problem(404, _NOT_VISIBLE)

    result = svc.engine.run(
        UsageQuery(
            accounts=(target.account_id,),
            metric=METRIC,
            # Both ends are inclusive at millisecond precision: [start, end + 1 ms).
            start=from_ms(start_ms),
            end=from_ms(end_ms + 1),
            granularity=Granularity.DAY,
            tz="UTC",
            filters=((LICENSEE, licensee.strip()),) if licensee is not None else (),
            tags=frozenset(t.strip() for t in (tags or "").split(",") if t.strip()),
            billable=True,  # paid lookups only
            key_id=target.id,
        )
    )
    # Day buckets cover every UTC day the range touches, idle ones with no groups: zero.
    daily = [
        (b.start.astimezone(UTC).date().isoformat(), round(sum(g.values[0] for g in b.groups)))
        for b in result.buckets
    ]
    body = {
        "result": {
            "start": isoformat(from_ms(start_ms)),
            "end": isoformat(from_ms(end_ms)),
            "total": sum(count for _, count in daily),
            "dailyCount": [{"date": day, "count": count} for day, count in daily],
        },
        "code": 2000,
        "message": "Success",
    }
    return JSONResponse(body)


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
}


def _error_doc(description: str, status: int, message: str) -> dict[str, Any]:
    example = {"code": status * 10, "message": message}
    return {
        "description": description,
        "content": {"application/json": {"schema": _ERROR_SCHEMA, "example": example}},
    }


_SUCCESS_SCHEMA = {
    "type": "object",
    "required": ["result", "code", "message"],
    "properties": {
        "result": {
            "type": "object",
            "required": ["start", "end", "total", "dailyCount"],
            "properties": {
                "start": {"type": "string", "format": "date-time"},
                "end": {"type": "string", "format": "date-time"},
                "total": {"type": "integer"},
                "dailyCount": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["date", "count"],
                        "properties": {
                            "date": {"type": "string", "format": "date"},
                            "count": {"type": "integer"},
                        },
                    },
                },
            },
        },
        "code": {"type": "integer", "enum": [2000]},
        "message": {"type": "string", "enum": ["Success"]},
    },
}

_EXAMPLE = {
    "result": {
        "start": "2025-03-13T12:00:00Z",
        "end": "2025-03-15T12:00:00Z",
        "total": 7,
        "dailyCount": [
            {"date": "2025-03-13", "count": 2},
            {"date": "2025-03-14", "count": 0},
            {"date": "2025-03-15", "count": 5},
        ],
    },
    "code": 2000,
    "message": "Success",
}


@router.get(
    PATH,
    tags=["contract: key usage"],
    summary="Usage Stats",
    dependencies=[Security(_bearer)],
    responses={
        200: {
            "description": "Paid lookups per UTC day, zero-filled, in date order.",
            "content": {"application/json": {"schema": _SUCCESS_SCHEMA, "example": _EXAMPLE}},
        },
        400: _error_doc(
            "start or end not an integer or out of range, start after end, a range over"
            " 90 days, or an empty licensee.",
            400,
            "start: 'yesterday' is not an integer; send a UNIX timestamp in milliseconds,"
            " e.g. 1418556452651",
        ),
        401: _error_doc(
            "No credential, or not a live key.",
            401,
            "no credential: send 'Authorization: Bearer <secret>' or ?user_token=<secret>",
        ),
        403: _error_doc(
            "The caller's key has no read scope.",
            403,
            "this key may not read usage: use a key with the read scope",
        ),
        404: _error_doc("The key does not exist, or the caller may not see it.", 404, _NOT_VISIBLE),
    },
)
async def key_usage(
    request: Request,
    key: str = Path(
        description="The key: its public id (e.g. key_acme_prod) or its full secret"
        " (e.g. ak_...), which is matched by hash and never logged by this service.",
        examples=["key_acme_prod"],
    ),
    start: str | None = Query(
        None,
        description="Start, inclusive: a UNIX timestamp in milliseconds. Default: 21 days"
        " before now.",
        examples=["1418556452651"],
    ),
    end: str | None = Query(
        None,
        description="End, inclusive: a UNIX timestamp in milliseconds. Default: now."
        " end - start may be at most 90 days.",
        examples=["1418556477882"],
    ),
    tags: str | None = Query(
        None,
        description="Comma-separated tags: counts only lookups that carry all of them.",
        examples=["foo,bar"],
    ),
    licensee: str | None = Query(
        None,
        description="Counts only lookups whose licensee dimension equals this.",
        examples=["sl_hk71kco54zGSGvF9eXXrvvnMOLLNh"],
    ),
    user_token: str | None = Query(
        None,
        description="The caller's secret, for clients that cannot send an Authorization"
        " header (which wins when both are sent).",
    ),
) -> JSONResponse:
    """The number of paid lookups (billable events of metric `lookups`) made with one key,
    per UTC day, over `[start, end]` (both inclusive, millisecond precision). `dailyCount`
    lists every UTC day the range touches, zero-filled, in date order; `total` is their sum.
    The caller may see a key of its own account or of an account below it; an operator key
    sees every key. A revoked key's usage is still reported."""
    try:
        return _report(request, key, start, end, tags, licensee, user_token)
    except Problem as problem:
        return problem.response()
    except Exception:
        # The app's handler would log the raw path, which may be a secret: log the template.
        log.exception("unhandled error on GET %s", PATH)
        return Problem(500, "internal error; the server log has the details").response()
