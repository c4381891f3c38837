"""Portal tokens (issue 18, item 4): a read key of one account that expires by the app's
clock, can be limited to metrics, and is revoked from the next request on."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Clock, Tenants, event
from usagemeter.api.app import create_app
from usagemeter.store import open_store
from usagemeter.store.base import Store
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.postgres import PostgresStore
from usagemeter.store.sqlite import SQLiteStore

QUERY = {
    "metric": "lookups",
    "start": "2025-03-01",
    "end": "2025-03-16",
    "granularity": "total",
    "include_subaccounts": "true",
}


def issue(client: TestClient, op: dict[str, str], account: str = "child", **body: Any) -> Any:
    response = client.post(f"/v1/accounts/{account}/portal-tokens", json=body, headers=op)
    assert response.status_code == 201, response.text
    return response.json()


def bearer(token: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token['token']}"}


def total(client: TestClient, token: dict[str, Any], account: str = "child", **q: Any) -> Any:
    return client.get("/v1/query", params={**QUERY, "account": account, **q}, headers=bearer(token))


@pytest.fixture
def usage(send: Any, tenants: Tenants) -> None:
    send(
        event("c1", "child", "lookups", "2025-03-10T10:00:00Z", value=2),
        event("g1", "grandchild", "lookups", "2025-03-10T11:00:00Z", value=3),
        event("c2", "child", "requests", "2025-03-10T12:00:00Z"),
        event("r1", "root", "lookups", "2025-03-10T12:00:00Z", value=100),
    )


def test_reads_its_account_like_a_read_key_and_nothing_else(
    client: TestClient, op: dict[str, str], usage: None
) -> None:
    token = issue(client, op)
    assert token["account_id"] == "child" and token["metrics"] is None
    assert token["expires_at"] == "2025-03-15T13:00:00Z"  # an hour on the app's clock
    assert total(client, token).json()["total"] == 2  # child and grandchild: lookups are counted
    assert total(client, token, account="grandchild").json()["total"] == 1
    for account in ("root", "sibling", "other"):
        assert total(client, token, account=account).status_code == 404
    # The seed endpoints take it as they take a read key.
    usage_v1 = client.get(
        "/v1/usage",
        params={"metric": "ApiCalls", "startDate": "2025-03-01", "endDate": "2025-03-15"},
        headers=bearer(token),
    )
    assert usage_v1.status_code == 200, usage_v1.text
    # Anything but reading is refused.
    h = bearer(token)
    assert (
        client.post("/v1/events", json=[event("x", "child", "m", 0)], headers=h).status_code == 403
    )
    assert client.post("/v1/accounts/child/keys", json={}, headers=h).status_code == 403
    assert client.get("/v1/accounts/child/keys", headers=h).status_code == 403
    assert client.post("/v1/accounts/child/portal-tokens", json={}, headers=h).status_code == 403
    assert client.delete(f"/v1/portal-tokens/{token['id']}", headers=h).status_code == 403
    assert client.get("/metrics", headers=h).status_code == 403


def test_expires_by_the_app_clock(
    client: TestClient, op: dict[str, str], clock: Clock, usage: None
) -> None:
    token = issue(client, op, expires_in=600)
    assert total(client, token).status_code == 200
    clock.at += timedelta(seconds=599)
    assert total(client, token).status_code == 200
    clock.at += timedelta(seconds=1)
    expired = total(client, token)
    assert expired.status_code == 401
    assert client.get("/v1/metrics", headers=bearer(token)).status_code == 401


def test_revoked_while_in_use(client: TestClient, op: dict[str, str], usage: None) -> None:
    token, other = issue(client, op), issue(client, op)
    assert total(client, token).status_code == 200
    revoked = client.delete(f"/v1/portal-tokens/{token['id']}", headers=op)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert total(client, token).status_code == 401
    assert total(client, other).status_code == 200  # only that one
    assert client.delete(f"/v1/portal-tokens/{token['id']}", headers=op).status_code == 200
    assert client.delete("/v1/portal-tokens/pt_nope", headers=op).status_code == 404


def test_limited_to_some_metrics(client: TestClient, op: dict[str, str], usage: None) -> None:
    token = issue(client, op, metrics=["lookups"])
    assert token["metrics"] == ["lookups"]
    assert total(client, token).json()["total"] == 2
    refused = total(client, token, metric="requests")
    assert refused.status_code == 403
    assert "requests" in refused.json()["error"]["message"]
    listed = client.get("/v1/metrics", params={"account": "child"}, headers=bearer(token))
    assert [m["metric"] for m in listed.json()["metrics"]] == ["lookups"]
    # An unrestricted caller afterwards is not held to the last token's metrics.
    assert total(client, issue(client, op), metric="requests").json()["total"] == 1


def test_dashboard_link_carries_the_token_in_the_fragment(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    token = issue(client, op)
    url = urlsplit(token["dashboard_url"])
    assert url.path == "/dashboard" and not url.query
    assert parse_qs(url.fragment) == {"token": [token["token"]], "account": ["child"]}
    page = client.get("/dashboard").text
    assert 'params.get("token")' in page


@pytest.mark.parametrize(
    "body, status, says",
    [
        ({"expires_in": 0}, 400, "expires_in"),
        ({"expires_in": 8 * 86400}, 400, "expires_in"),
        ({"metrics": []}, 400, "metrics"),
        ({"expires_in": "soon"}, 400, "expires_in"),
        ({"scopes": ["ingest"]}, 400, "scopes"),
    ],
)
def test_bad_requests_say_what_to_fix(
    client: TestClient, op: dict[str, str], tenants: Tenants, body: Any, status: int, says: str
) -> None:
    response = client.post("/v1/accounts/child/portal-tokens", json=body, headers=op)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]


def test_only_an_operator_issues_them(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    url = "/v1/accounts/child/portal-tokens"
    assert client.post(url, json={}).status_code == 401
    assert client.post(url, json={}, headers=tenants.headers("child")).status_code == 403
    assert client.post("/v1/accounts/nope/portal-tokens", json={}, headers=op).status_code == 404


def test_another_server_on_the_same_store_sees_issue_and_revocation(
    client: TestClient,
    op: dict[str, str],
    store: Store,
    db_path: Path,
    request: pytest.FixtureRequest,
    clock: Clock,
    usage: None,
) -> None:
    """Tokens live in the store, not in a process: a second server over the same database
    (a second process, as far as the store can tell) takes a token the first issued, and
    refuses it from the request after the first revoked it."""
    other: Store
    if isinstance(store, PostgresStore):
        other = PostgresStore(request.getfixturevalue("postgres_url"), pool_size=2)
    elif isinstance(store, ClickHouseStore):
        other = open_store(request.getfixturevalue("clickhouse_home"))
    else:
        other = SQLiteStore(db_path)
    try:
        with TestClient(create_app(other, now=clock)) as second:
            token = issue(client, op)
            assert total(second, token).status_code == 200
            assert client.delete(f"/v1/portal-tokens/{token['id']}", headers=op).status_code == 200
            assert total(second, token).status_code == 401
    finally:
        other.close()
