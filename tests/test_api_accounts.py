"""Accounts and keys over HTTP, and the tenancy rules."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import Tenants, event
from usagemeter.auth import issue_key
from usagemeter.model import Scope


def test_create_account_and_errors(client: TestClient, op: dict[str, str]) -> None:
    created = client.post(
        "/v1/accounts",
        json={
            "name": "Acme",
            "id": "acme",
            "billing_cycle": {"anchor": "2024-01-31", "period": "month"},
        },
        headers=op,
    )
    assert created.status_code == 201
    assert created.json()["id"] == "acme"
    assert created.json()["billing_cycle"] == {"anchor": "2024-01-31", "period": "month"}
    generated = client.post("/v1/accounts", json={"name": "Child", "parent_id": "acme"}, headers=op)
    assert generated.status_code == 201
    assert generated.json()["id"].startswith("acct_")
    assert generated.json()["parent_id"] == "acme"

    again = client.post("/v1/accounts", json={"name": "Acme", "id": "acme"}, headers=op)
    assert again.status_code == 409
    orphan = client.post("/v1/accounts", json={"name": "X", "parent_id": "ghost"}, headers=op)
    assert orphan.status_code == 400 and "ghost" in orphan.json()["error"]["message"]
    cycle = client.post(
        "/v1/accounts",
        json={"name": "X", "billing_cycle": {"anchor": "31/01/2024", "period": "week"}},
        headers=op,
    )
    assert cycle.status_code == 400 and "billing_cycle" in cycle.json()["error"]["message"]
    unknown = client.post("/v1/accounts", json={"name": "X", "colour": "red"}, headers=op)
    assert unknown.status_code == 400 and "colour" in unknown.json()["error"]["message"]
    assert client.post("/v1/accounts", json={"name": "X"}).status_code == 401


def test_account_keys_may_not_create_accounts(client: TestClient, tenants: Tenants) -> None:
    response = client.post("/v1/accounts", json={"name": "X"}, headers=tenants.headers("root"))
    assert response.status_code == 403


def test_key_lifecycle(client: TestClient, op: dict[str, str], tenants: Tenants) -> None:
    created = client.post(
        "/v1/accounts/child/keys", json={"name": "prod", "prefix": "ak_"}, headers=op
    )
    assert created.status_code == 201
    body = created.json()
    secret, key_id = body["key"], body["id"]
    assert secret.startswith("ak_") and len(secret) > 30
    assert body["scopes"] == ["read"]

    listed = client.get("/v1/accounts/child/keys", headers=op).json()["data"]
    assert key_id in [k["id"] for k in listed]
    assert all("key" not in k for k in listed)  # the secret is shown once only
    assert secret not in str(listed)

    mine = {"Authorization": f"Bearer {secret}"}
    assert client.get("/v1/accounts/child", headers=mine).status_code == 200
    # Key management needs the manage scope: a key without it is told so, whatever it names.
    for target in ("child", "root"):
        response = client.post(
            f"/v1/accounts/{target}/keys", json={}, headers=tenants.headers("child")
        )
        assert response.status_code == 403

    revoked = client.delete(f"/v1/keys/{key_id}", headers=op)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert client.get("/v1/accounts/child", headers=mine).status_code == 401
    assert client.delete(f"/v1/keys/{key_id}", headers=op).status_code == 200  # harmless twice
    assert client.delete("/v1/keys/key_nope", headers=op).status_code == 404


def test_tenancy_parent_reads_children_never_the_reverse(
    client: TestClient, tenants: Tenants
) -> None:
    root, child = tenants.headers("root"), tenants.headers("child")
    assert client.get("/v1/accounts/grandchild", headers=root).status_code == 200
    assert client.get("/v1/accounts/grandchild", headers=child).status_code == 200
    # Not the parent, not a sibling, not another tenant; and the same answer as for nothing.
    for target in ("root", "sibling", "other", "does-not-exist"):
        response = client.get(f"/v1/accounts/{target}", headers=child)
        assert response.status_code == 404
        assert (
            response.json()["error"]["message"]
            == f"account {target!r} not found, or this key may not read it"
        )
    listed = client.get("/v1/accounts", headers=child).json()["data"]
    assert sorted(a["id"] for a in listed) == ["child", "grandchild"]
    sibling_manager = {
        "Authorization": "Bearer " + issue_key(tenants.store, "sibling", scopes=[Scope.MANAGE])[1]
    }
    assert client.get("/v1/accounts/child/keys", headers=sibling_manager).status_code == 404
    assert client.delete("/v1/keys/key_child", headers=sibling_manager).status_code == 404


def test_queries_respect_tenancy(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: object
) -> None:
    send(  # type: ignore[operator]
        event("1", "root", "m", "2025-01-02T00:00:00Z"),
        event("2", "child", "m", "2025-01-02T00:00:00Z"),
        event("3", "grandchild", "m", "2025-01-02T00:00:00Z"),
        event("4", "sibling", "m", "2025-01-02T00:00:00Z"),
    )
    params = {"metric": "m", "start": "2025-01-01", "end": "2025-01-03", "granularity": "total"}

    def total(account: str, who: str) -> object:
        r = client.get(
            "/v1/query", params={**params, "account": account}, headers=tenants.headers(who)
        )
        return r.json()["total"] if r.status_code == 200 else r.status_code

    assert total("root", "root") == 4
    assert total("child", "root") == 2
    assert total("child", "child") == 2
    assert total("root", "child") == 404
    assert total("sibling", "child") == 404
    only = client.get(
        "/v1/query",
        params={**params, "account": "root", "include_subaccounts": "false"},
        headers=op,
    )
    assert only.json()["total"] == 1
