"""Accounts and API keys: the tenants of the service and their credentials."""

import secrets
from datetime import date
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from usagemeter.api.native import NOT_READABLE, caller, reader
from usagemeter.api.openapi import standalone_schema
from usagemeter.api.responses import ApiError, JSONResponse
from usagemeter.api.services import services
from usagemeter.auth import (
    KEY_ID_PATTERN,
    can_manage,
    can_read,
    grantable,
    issue_key,
)
from usagemeter.ingest import NUL
from usagemeter.model import Account, ApiKey, Scope
from usagemeter.store.base import Conflict, NotFound
from usagemeter.timewindows import BillingCycle, isoformat

router = APIRouter()


def operator(request: Request) -> ApiKey:
    key = caller(request)
    if not key.is_operator:
        raise ApiError(403, "forbidden", "this needs an operator key")
    return key


MAX_BODY = 64 * 1024  # an account or a key is a few hundred bytes of JSON
MAX_NAME = 200
# Names are refused with U+0000 on every store, as PostgreSQL's text cannot hold it: an
# account or key one store takes must move to any other.
NUL_MESSAGE = "name: contains a NUL character (\\u0000); remove it"


async def small_body(request: Request) -> bytes:
    """The request body, read no further than MAX_BODY: a huge body is refused as it
    streams in, not after it has filled the server's memory."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, "too_large", f"this request body holds at most {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _not_found(what: str, ident: str) -> ApiError:
    """The one answer for a missing account or key and for another tenant's."""
    return ApiError(404, "not_found", f"{what} {ident!r} {NOT_READABLE}")


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
    data: AccountIn = decode(AccountIn, await small_body(request))
    errors = []
    if not data.name.strip():
        errors.append("name: must not be empty")
    if len(data.name) > MAX_NAME:
        errors.append(f"name: at most {MAX_NAME} characters")
    if NUL in data.name:
        errors.append(NUL_MESSAGE)
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
    """Every account (operator), or the accounts a read key may read: its own and its
    descendants, as ``GET /v1/accounts/{id}`` does."""
    key = reader(request)
    store = services(request).store
    if key.is_operator:
        accounts = store.list_accounts()
    else:
        assert key.account_id is not None  # issue_key: every non-operator key has one
        readable = set(store.descendants(key.account_id))
        accounts = [a for a in store.list_accounts() if a.id in readable]
    return JSONResponse({"data": [account_json(a) for a in accounts]})


def readable_account(request: Request, key: ApiKey, account_id: str) -> Account:
    store = services(request).store
    if not can_read(store, key, account_id):
        raise _not_found("account", account_id)
    return store.get_account(account_id)


@router.get("/v1/accounts/{account_id}", tags=["accounts"])
async def get_account(request: Request, account_id: str) -> JSONResponse:
    return JSONResponse(account_json(readable_account(request, reader(request), account_id)))


# ---------------------------------------------------------------------- keys

SCOPES_HINT = "scopes: use 'read', 'ingest' and/or 'manage'"


class KeyIn(msgspec.Struct, forbid_unknown_fields=True):
    name: str = ""
    prefix: str = "um_"
    id: str | None = None
    scopes: list[str] = msgspec.field(default_factory=lambda: ["read"])


def manager(request: Request) -> ApiKey:
    """The caller, if its key may manage keys at all. Checked before any account or key is
    looked up, so this 403 says nothing about what the request names."""
    key = caller(request)
    if not key.is_operator and Scope.MANAGE not in key.scopes:
        raise ApiError(403, "forbidden", "this key has no manage scope: managing keys needs one")
    return key


def managed_account(request: Request, key: ApiKey, account_id: str) -> None:
    """Pass if ``key`` manages ``account_id``'s keys; else the 404 of a missing account."""
    if not can_manage(services(request).store, key, account_id):
        raise _not_found("account", account_id)


def parse_scopes(caller_key: ApiKey, data: KeyIn) -> list[Scope]:
    try:
        scopes = [Scope(s) for s in data.scopes]
    except ValueError:
        raise ApiError(400, "invalid_key", SCOPES_HINT) from None
    if not scopes:
        raise ApiError(400, "invalid_key", f"{SCOPES_HINT}; at least one")
    if Scope.OPERATOR in scopes:
        message = "scopes: operator keys are made with 'usagemeter keys create --operator'"
        raise ApiError(400, "invalid_key", message)
    if not grantable(caller_key, scopes):
        held = ", ".join(sorted(s.value for s in caller_key.scopes))
        message = f"scopes: a key grants only scopes it holds itself ({held})"
        raise ApiError(403, "forbidden", message)
    return scopes


@router.post(
    "/v1/accounts/{account_id}/keys",
    status_code=201,
    tags=["keys"],
    openapi_extra=body_doc(KeyIn, {"name": "production", "prefix": "ak_", "scopes": ["read"]}),
)
async def create_key(request: Request, account_id: str) -> JSONResponse:
    """Create a key for an account (operator, or a manage key of that account or an
    ancestor), with scopes the caller holds itself. The response's ``key`` is the secret:
    it is shown here once and never again. Only an operator chooses a key's ``id``."""
    key = manager(request)
    managed_account(request, key, account_id)
    data: KeyIn = decode(KeyIn, await small_body(request))
    scopes = parse_scopes(key, data)
    if len(data.name) > MAX_NAME:
        raise ApiError(400, "invalid_key", f"name: at most {MAX_NAME} characters")
    if NUL in data.name:
        raise ApiError(400, "invalid_key", NUL_MESSAGE)
    if data.id is not None and not key.is_operator:
        # Key ids are global: a chosen id that is taken would tell another tenant's key
        # from a free id. Generated ids are random and never collide.
        message = "id: only an operator key chooses key ids; leave it out and one is made"
        raise ApiError(400, "invalid_key", message)
    store = services(request).store
    try:
        created, secret = await run_in_threadpool(
            lambda: issue_key(
                store, account_id, name=data.name, prefix=data.prefix, scopes=scopes, key_id=data.id
            )
        )
    except NotFound:
        raise _not_found("account", account_id) from None
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, "invalid_key", str(exc)) from None
    return JSONResponse({**key_json(created), "key": secret}, status_code=201)


@router.get("/v1/accounts/{account_id}/keys", tags=["keys"])
async def list_keys(request: Request, account_id: str) -> JSONResponse:
    """The account's keys, without secrets (operator, or a manage key above it)."""
    managed_account(request, manager(request), account_id)
    keys = services(request).store.list_keys(account_id)
    return JSONResponse({"data": [key_json(k) for k in keys]})


@router.delete("/v1/keys/{key_id}", tags=["keys"])
def revoke_key(request: Request, key_id: str) -> JSONResponse:
    """Revoke a key: it stops working at once. Revoking twice is harmless. Operator keys are
    revoked by operators; account keys also by a manage key of their account or above."""
    key = manager(request)
    store = services(request).store
    try:
        target = store.get_key(key_id)
    except NotFound:
        target = None
    if target is None or not (
        key.is_operator
        or (target.account_id is not None and can_manage(store, key, target.account_id))
    ):
        raise _not_found("key", key_id)  # missing, another tenant's, or an operator key
    return JSONResponse(key_json(store.revoke_key(key_id)))
