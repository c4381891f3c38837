"""The tenancy matrix: every endpoint, every credential kind, every target.

Tree: root ── child ── grandchild; root ── sibling; other (conftest.Tenants). For each
(credential, endpoint, target) the rules of the README's "Security model" say whether the
call is allowed. Checked: allowed calls succeed; nothing else does; no answer is a 500; and
a target outside the caller's tenancy gets exactly the answer a target that does not exist
gets (status and body, with the id swapped), so no error tells another tenant's account or
key from a missing one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Tenants
from usagemeter.auth import issue_key
from usagemeter.model import Scope
from usagemeter.store.sqlite import SQLiteStore

ACCOUNTS = ("root", "child", "grandchild", "sibling", "other")
MISSING = "nobody"
TREE = {  # each account and the accounts below it
    "root": {"root", "child", "grandchild", "sibling"},
    "child": {"child", "grandchild"},
    "grandchild": {"grandchild"},
    "sibling": {"sibling"},
    "other": {"other"},
}


@dataclass(frozen=True)
class Credential:
    name: str
    secret: str
    account: str | None  # None: operator, or no valid key at all
    scopes: frozenset[Scope]
    valid: bool = True

    @property
    def operator(self) -> bool:
        return Scope.OPERATOR in self.scopes

    def within(self, target: str) -> bool:
        return self.account is not None and target in TREE[self.account]

    def may(self, scope: Scope, target: str) -> bool:
        if not self.valid or target == MISSING:
            return False
        if self.operator:
            return True
        if scope is Scope.INGEST:
            return Scope.INGEST in self.scopes and self.account == target
        return scope in self.scopes and self.within(target)


def credentials(store: SQLiteStore) -> list[Credential]:
    made = []

    def make(name: str, account: str | None, *scopes: Scope) -> Credential:
        secret = issue_key(store, account, name=name, scopes=scopes)[1]
        made.append(Credential(name, secret, account, frozenset(scopes)))
        return made[-1]

    make("operator", None, Scope.OPERATOR)
    make("root-read", "root", Scope.READ)
    make("root-ingest", "root", Scope.INGEST)
    make("root-manage", "root", Scope.MANAGE)
    make("parent-all", "root", Scope.READ, Scope.INGEST, Scope.MANAGE)
    make("child-all", "child", Scope.READ, Scope.INGEST, Scope.MANAGE)
    make("sibling-all", "sibling", Scope.READ, Scope.INGEST, Scope.MANAGE)
    revoked = make("revoked", "root", Scope.READ, Scope.INGEST, Scope.MANAGE)
    store.revoke_key(store.list_keys("root")[-1].id)
    made[-1] = Credential("revoked", revoked.secret, "root", revoked.scopes, valid=False)
    unknown = "um_" + "Z" * 32
    made.append(Credential("unknown", unknown, None, frozenset(), valid=False))
    return made


Call = Callable[[TestClient, Credential, str], Any]


def bearer(c: Credential) -> dict[str, str]:
    return {"Authorization": f"Bearer {c.secret}"}


def grantable(c: Credential) -> list[str]:
    return sorted(s.value for s in c.scopes - {Scope.OPERATOR}) or ["read"]


# endpoint name -> (the scope it needs, how to call it for a target account)
ENDPOINTS: dict[str, tuple[Scope, Call]] = {
    "query": (
        Scope.READ,
        lambda cl, c, t: cl.get(
            "/v1/query",
            params={"metric": "m", "account": t, "start": "2025-01-01", "end": "2025-01-03"},
            headers=bearer(c),
        ),
    ),
    "get account": (Scope.READ, lambda cl, c, t: cl.get(f"/v1/accounts/{t}", headers=bearer(c))),
    "list keys": (
        Scope.MANAGE,
        lambda cl, c, t: cl.get(f"/v1/accounts/{t}/keys", headers=bearer(c)),
    ),
    "create key": (
        Scope.MANAGE,
        lambda cl, c, t: cl.post(
            f"/v1/accounts/{t}/keys", json={"scopes": grantable(c)}, headers=bearer(c)
        ),
    ),
    "revoke key": (
        Scope.MANAGE,
        # Each account's own key from conftest.Tenants: key_<account>.
        lambda cl, c, t: cl.delete(f"/v1/keys/key_{t}", headers=bearer(c)),
    ),
    "ingest": (
        Scope.INGEST,
        lambda cl, c, t: cl.post(
            "/v1/events",
            json=[{"id": "e1", "account": t, "metric": "m", "ts": "2025-01-02T00:00:00Z"}],
            headers=bearer(c),
        ),
    ),
    "detail-usage-time": (
        Scope.READ,
        lambda cl, c, t: cl.get(
            "/analytics/detail-usage-time",
            params={"account": t},
            headers={**bearer(c), "x-api-version": "2025-09"},
        ),
    ),
    "key usage": (
        Scope.READ,
        lambda cl, c, t: cl.get(f"/keys/key_{t}/usage", headers=bearer(c)),
    ),
    "account usage": (
        Scope.READ,
        lambda cl, c, t: cl.get(
            "/v1/account/usage/",
            params={"account": t, "start_date": "2025-01-01", "end_date": "2025-01-05"},
            headers={"X-Api-Key": c.secret},
        ),
    ),
    "usage v1": (
        Scope.READ,
        lambda cl, c, t: cl.get("/v1/usage", params={"account": t}, headers=bearer(c)),
    ),
    "account analytics": (
        Scope.READ,
        lambda cl, c, t: cl.get(
            f"/v1/accounts/{t}/analytics/usage", headers={"X-API-Key": c.secret}
        ),
    ),
}

# Trace ids and the like: random per response, not part of what a caller learns.
_RANDOM = re.compile(r"[0-9a-f]{32}")


def answer(response: Any, target: str) -> tuple[int, str]:
    body = _RANDOM.sub("<random>", response.text)
    return response.status_code, body.replace(f"key_{target}", "<key>").replace(target, "<id>")


@pytest.fixture
def matrix(client: TestClient, store: SQLiteStore, tenants: Tenants) -> list[Credential]:
    return credentials(store)


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_tenancy_matrix(client: TestClient, matrix: list[Credential], endpoint: str) -> None:
    scope, call = ENDPOINTS[endpoint]
    for cred in matrix:
        missing = answer(call(client, cred, MISSING), MISSING)
        assert missing[0] < 500 and missing[0] != 200, (cred.name, missing)
        for target in ACCOUNTS:
            response = call(client, cred, target)
            where = (endpoint, cred.name, target, response.status_code, response.text[:300])
            assert response.status_code < 500, where
            assert response.headers["content-type"].startswith("application/json"), where
            if cred.may(scope, target):
                assert 200 <= response.status_code < 300, where
                continue
            assert response.status_code in (400, 401, 403, 404, 422), where
            if not cred.valid:
                assert response.status_code in (401, 403), where
            if cred.operator or not cred.within(target):
                # Another tenant's account or key: exactly the answer for a missing one.
                assert answer(response, target) == missing, where
