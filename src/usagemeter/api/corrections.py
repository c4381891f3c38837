"""Corrections of stored usage (voids and amends) and account deletion: operator routes.

The rules (what a void does, why an amend takes a new id) are in corrections.py and in the
README's Operations section.
"""

import math
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from usagemeter.api.responses import ApiError, JSONResponse
from usagemeter.api.services import services
from usagemeter.api.tenants import body_doc, decode, operator, small_body
from usagemeter.corrections import Amendment, RawDropped, VoidRecord, VoidSelector
from usagemeter.ingest import MAX_TEXT
from usagemeter.store.base import Conflict, NotFound
from usagemeter.timewindows import from_ms, isoformat, parse_instant, to_ms

router = APIRouter()
MAX_REASON = 1000


class VoidIn(msgspec.Struct, forbid_unknown_fields=True):
    account: str
    reason: str
    ids: list[str] | None = None
    metric: str | None = None
    start: str | None = None
    end: str | None = None
    key: str | None = None
    dimensions: dict[str, str] | None = None


class AmendIn(msgspec.Struct, forbid_unknown_fields=True):
    account: str
    id: str
    value: float
    reason: str
    new_id: str | None = None


def _instant(name: str, text: str | None, problems: list[str]) -> int | None:
    if text is None:
        return None
    try:
        return to_ms(parse_instant(text))
    except ValueError as exc:
        problems.append(f"{name}: {exc}")
        return None


def _reason(reason: str, problems: list[str]) -> None:
    if not reason.strip():
        problems.append("reason: required: say why (it is kept with the void)")
    elif len(reason) > MAX_REASON:
        problems.append(f"reason: at most {MAX_REASON} characters")


def _invalid(problems: list[str]) -> ApiError:
    return ApiError(400, "invalid_body", "; ".join(problems))


def void_json(record: VoidRecord) -> dict[str, Any]:
    selector = record.selector.as_dict()
    for name in ("start_ms", "end_ms"):
        if name in selector:
            selector[name[:-3]] = isoformat(from_ms(selector.pop(name)))
    return {
        "id": record.id,
        "account": record.account_id,
        "selector": selector,
        "reason": record.reason,
        "by": record.by,
        "at": isoformat(from_ms(record.at_ms)),
        "count": record.count,
        "replacement": record.replacement,
    }


async def _void(
    request: Request, selector: VoidSelector, reason: str, amend: Amendment | None
) -> JSONResponse:
    key = operator(request)
    svc = services(request)
    try:
        selector.validate()
        record = await run_in_threadpool(
            svc.store.void_events, selector, reason, key.id, to_ms(svc.now()), amend
        )
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except (Conflict, RawDropped) as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, "invalid_body", str(exc)) from None
    return JSONResponse(void_json(record))


@router.post(
    "/v1/events/void",
    tags=["events"],
    openapi_extra=body_doc(
        VoidIn,
        {
            "account": "acme",
            "metric": "lookups",
            "start": "2025-01-31T00:00:00Z",
            "end": "2025-02-01T00:00:00Z",
            "dimensions": {"licensee": "sl_1"},
            "reason": "test traffic",
        },
    ),
)
async def void_events(request: Request) -> JSONResponse:
    """Void events of one account (operator key): by ``ids``, or every event of ``metric``
    in [``start``, ``end``), optionally of one ``key`` and with given ``dimensions``. Every
    report reflects it at once; the ids stay taken (a retry of a voided event is a
    duplicate). ``reason`` is required and kept with the void."""
    body: VoidIn = decode(VoidIn, await small_body(request))
    problems: list[str] = []
    start = _instant("start", body.start, problems)
    end = _instant("end", body.end, problems)
    _reason(body.reason, problems)
    if problems:
        raise _invalid(problems)
    selector = VoidSelector(
        account_id=body.account,
        ids=tuple(body.ids or ()),
        metric=body.metric,
        start_ms=start,
        end_ms=end,
        key_id=body.key,
        dimensions=tuple(sorted((body.dimensions or {}).items())),
    )
    return await _void(request, selector, body.reason, None)


@router.post(
    "/v1/events/amend",
    tags=["events"],
    openapi_extra=body_doc(
        AmendIn, {"account": "acme", "id": "evt_0001", "value": 3, "reason": "double-billed"}
    ),
)
async def amend_event(request: Request) -> JSONResponse:
    """Void one event and store its replacement with a new ``value`` (operator key), under
    ``new_id`` or ``<id>~<void id>``: the old id stays taken. The answer is the void, whose
    ``replacement`` names the new event."""
    body: AmendIn = decode(AmendIn, await small_body(request))
    problems: list[str] = []
    _reason(body.reason, problems)
    if not math.isfinite(body.value):
        problems.append("value: must be a finite number")
    if body.new_id is not None and not 0 < len(body.new_id) <= MAX_TEXT:
        problems.append(f"new_id: 1 to {MAX_TEXT} characters")
    if problems:
        raise _invalid(problems)
    selector = VoidSelector(account_id=body.account, ids=(body.id,))
    return await _void(request, selector, body.reason, Amendment(body.value, body.new_id))


@router.get("/v1/events/voids", tags=["events"])
async def list_voids(request: Request, account: str | None = None) -> JSONResponse:
    """Every void (operator key), oldest first; only one account's with ``account``."""
    operator(request)
    records = await run_in_threadpool(services(request).store.list_voids, account)
    return JSONResponse({"data": [void_json(r) for r in records]})


@router.delete("/v1/accounts/{account_id}", tags=["accounts"])
async def delete_account(request: Request, account_id: str) -> JSONResponse:
    """Delete an account for a privacy request (operator key): the account, its subaccounts,
    their keys, events, rollups, voids, limits, alerts and portal tokens, in one transaction
    where the store has them. The answer counts the rows removed per table."""
    operator(request)
    store = services(request).store
    try:
        accounts = await run_in_threadpool(store.descendants, account_id)
        rows = await run_in_threadpool(store.delete_account, account_id)
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return JSONResponse({"deleted": accounts, "rows": rows})
