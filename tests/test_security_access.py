"""Scopes and tenancy of key management (issue 12, items 1-4), one regression test each."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import Tenants, event
from usagemeter.auth import issue_key
from usagemeter.model import Scope
from usagemeter.store.sqlite import SQLiteStore


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def key_of(store: SQLiteStore, account: str, *scopes: Scope) -> tuple[str, dict[str, str]]:
    key, secret = issue_key(store, account, scopes=scopes)
    return key.id, bearer(secret)


def test_a_read_key_creates_no_keys(client: TestClient, store: SQLiteStore, tenants: Tenants):
    """Item 1: child's read-only key made an ingest key (201), and that key ingested."""
    _, read = key_of(store, "child", Scope.READ)
    made = client.post("/v1/accounts/child/keys", json={"scopes": ["ingest"]}, headers=read)
    assert made.status_code == 403, made.text
    assert "manage" in made.json()["error"]["message"]
    assert client.post("/v1/accounts/child/keys", json={}, headers=read).status_code == 403


def test_a_manage_key_grants_only_scopes_it_holds(
    client: TestClient, store: SQLiteStore, tenants: Tenants
) -> None:
    _, manage_read = key_of(store, "child", Scope.MANAGE, Scope.READ)
    wider = client.post(
        "/v1/accounts/grandchild/keys", json={"scopes": ["read", "ingest"]}, headers=manage_read
    )
    assert wider.status_code == 403 and "grants only" in wider.json()["error"]["message"]
    operator = client.post(
        "/v1/accounts/grandchild/keys", json={"scopes": ["operator"]}, headers=manage_read
    )
    assert operator.status_code == 400
    # Within its scopes, for its own account and the ones below it: fine.
    made = client.post(
        "/v1/accounts/grandchild/keys", json={"scopes": ["read"]}, headers=manage_read
    )
    assert made.status_code == 201 and made.json()["scopes"] == ["read"]
    new = bearer(made.json()["key"])
    assert client.get("/v1/accounts/grandchild", headers=new).status_code == 200
    assert client.post("/v1/events", json=[], headers=new).status_code == 403
    # Never above or beside it.
    for target in ("root", "sibling", "other", "nope"):
        assert (
            client.post(f"/v1/accounts/{target}/keys", json={}, headers=manage_read).status_code
            == 404
        )


def test_a_read_key_revokes_nothing(client: TestClient, store: SQLiteStore, tenants: Tenants):
    """Item 2: root's read key revoked child's ingest key (200)."""
    _, read = key_of(store, "root", Scope.READ)
    target, target_headers = key_of(store, "child", Scope.INGEST)
    response = client.delete(f"/v1/keys/{target}", headers=read)
    assert response.status_code == 403
    assert store.get_key(target).revoked_at is None
    ok = client.post(
        "/v1/events",
        json=[event("e1", "child", "m", "2025-01-02T00:00:00Z")],
        headers=target_headers,
    )
    assert ok.status_code == 200
    # A manage key above it may; a manage key beside it cannot even see it.
    _, sibling_manage = key_of(store, "sibling", Scope.MANAGE)
    assert client.delete(f"/v1/keys/{target}", headers=sibling_manage).status_code == 404
    _, manage = key_of(store, "root", Scope.MANAGE)
    assert client.delete(f"/v1/keys/{target}", headers=manage).status_code == 200
    assert store.get_key(target).revoked_at is not None


def test_listing_keys_needs_manage(client: TestClient, store: SQLiteStore, tenants: Tenants):
    _, read = key_of(store, "root", Scope.READ)
    assert client.get("/v1/accounts/child/keys", headers=read).status_code == 403
    _, manage = key_of(store, "root", Scope.MANAGE)
    listed = client.get("/v1/accounts/child/keys", headers=manage)
    assert listed.status_code == 200
    assert "key_child" in [k["id"] for k in listed.json()["data"]]


def test_an_operator_key_is_invisible_to_account_keys(
    client: TestClient, store: SQLiteStore, tenants: Tenants, op: dict[str, str]
) -> None:
    operator_id = store.list_keys(None)[0].id
    _, manage = key_of(store, "root", Scope.MANAGE)
    missing = client.delete("/v1/keys/key_missing", headers=manage).json()["error"]["message"]
    answer = client.delete(f"/v1/keys/{operator_id}", headers=manage)
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == missing.replace("key_missing", operator_id)


def test_event_key_references_do_not_leak_other_tenants_keys(
    client: TestClient, tenants: Tenants
) -> None:
    """Item 3: another tenant's key id answered "does not belong", a missing one "does not
    exist"."""

    def message(key_id: str) -> str:
        body = [event("e", "child", "m", "2025-01-02T00:00:00Z", key=key_id)]
        response = client.post("/v1/events", json=body, headers=tenants.headers("child"))
        assert response.status_code == 400
        text: str = response.json()["error"]["details"]["errors"][0]["message"]
        return text.replace(key_id, "<id>")

    assert message("key_root") == message("key_never_made")


def test_chosen_key_ids_are_for_operators_only(
    client: TestClient, store: SQLiteStore, tenants: Tenants, op: dict[str, str]
) -> None:
    """Item 3: a chosen id answered 409 "already taken" for another tenant's key id."""
    _, manage = key_of(store, "root", Scope.MANAGE, Scope.READ)
    taken = client.post("/v1/accounts/root/keys", json={"id": "key_other"}, headers=manage)
    free = client.post("/v1/accounts/root/keys", json={"id": "key_free"}, headers=manage)
    assert taken.status_code == free.status_code == 400
    assert taken.json()["error"]["message"] == free.json()["error"]["message"]
    made = client.post("/v1/accounts/root/keys", json={}, headers=manage).json()
    assert len(made["id"]) >= 4 + 32  # "key_" and 128 random bits
    chosen = client.post("/v1/accounts/root/keys", json={"id": "key_mine"}, headers=op)
    assert chosen.status_code == 201


def test_an_ingest_key_reads_no_accounts(client: TestClient, store: SQLiteStore, tenants: Tenants):
    """Item 4: an ingest-only key listed accounts (200) it could not get one by one (404)."""
    _, ingest = key_of(store, "root", Scope.INGEST)
    listed, got = (
        client.get("/v1/accounts", headers=ingest),
        client.get("/v1/accounts/root", headers=ingest),
    )
    assert listed.status_code == got.status_code == 403
    assert "no read scope" in listed.json()["error"]["message"] == got.json()["error"]["message"]
    query = client.get("/v1/query", params={"metric": "m"}, headers=ingest)
    assert query.status_code == 403
    _, read = key_of(store, "root", Scope.READ)
    listed = [a["id"] for a in client.get("/v1/accounts", headers=read).json()["data"]]
    for account_id in listed:
        assert client.get(f"/v1/accounts/{account_id}", headers=read).status_code == 200
    assert sorted(listed) == ["child", "grandchild", "root", "sibling"]


def test_the_cli_makes_manage_keys(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from usagemeter.cli import app

    runner = CliRunner()
    db = str(tmp_path / "cli.db")
    assert runner.invoke(app, ["accounts", "create", "A", "--id", "a", "--db", db]).exit_code == 0
    made = runner.invoke(
        app,
        ["keys", "create", "--account", "a", "--scope", "manage", "--scope", "read", "--db", db],
    )
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["scopes"] == ["manage", "read"]
