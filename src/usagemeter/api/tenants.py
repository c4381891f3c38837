"""Accounts and API keys: the tenants of the service and their credentials."""

import secrets
from datetime import date
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from usagemeter.api.native import NOT_READABLE, caller
from usagemeter.api.openapi import standalone_schema
from usagemeter.api.responses import ApiError, JSONResponse
from usagemeter.api.services import services
from usagemeter.auth import KEY_ID_PATTERN, can_read, can_see_key, issue_key
from usagemeter.model import Account, ApiKey, Scope
from usagemeter.store.base import Conflict, NotFound
from usagemeter.timewindows import BillingCycle, isoformat

router = APIRouter()


def operator(request: Request) -> ApiKey:
    key = caller(request)
    if not key.is_operator:
        raise ApiError(403, "forbidden", "this needs an operator key")
    return key


def decode(model: type[Any], body: bytes) -> Any:
    try:
        return msgspec.json.decode(body or b"{}", type=model)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_body", f"request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None


def body_doc(model: type[Any], example: Any) -> dict[str, Any]:
    """OpenAPI for a body we decode ourselves (to answer in our own error envelope)."""
    schema = standalone_schema(model)
    content = {"application/json": {"schema": schema, "example": example}}
    return {"requestBody": {"required": True, "content": content}}


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
    openapi_extra=body_doc(
        AccountIn, {"name": "Acme", "billing_cycle": {"anchor": "2025-01-31", "period": "month"}}
    ),
)
async def create_account(request: Request) -> JSONResponse:
    """Create an account (operator key). ``id`` is optional: your own customer id, or one is
    made. ``parent_id`` makes it a subaccount; the parent then sees its usage."""
    operator(request)
    data: AccountIn = decode(AccountIn, await request.body())
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
    openapi_extra=body_doc(KeyIn, {"name": "production", "prefix": "ak_"}),
)
async def create_key(request: Request, account_id: str) -> JSONResponse:
    """Create a key for an account (operator, or a key of that account). The response's
    ``key`` is the secret: it is shown here once and never again."""
    key = caller(request)
    if not key.is_operator and key.account_id != account_id:
        raise ApiError(404, "not_found", f"account {account_id!r} {NOT_READABLE}")
    data: KeyIn = decode(KeyIn, await request.body())
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
