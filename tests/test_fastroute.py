"""POST /v1/events past the router (api/fastroute.py) answers exactly as the routed endpoint.

Two apps over two identical stores take the same requests: one as ``create_app`` builds it,
one with the short road taken out, so that its requests go through FastAPI's router. Every
answer must be the same, byte for byte, errors included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import Clock, event
from usagemeter.api import native
from usagemeter.api.app import create_app
from usagemeter.api.fastroute import FastRoute
from usagemeter.auth import issue_key
from usagemeter.model import Account, Scope
from usagemeter.store.sqlite import SQLiteStore

OPERATOR = "op_secret_for_the_parity_test"
READER = "ak_reader_for_the_parity_test"
REVOKED = "ak_revoked_for_the_parity_test"


def _store(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    store.create_account(Account("acme", "Acme"))
    issue_key(store, None, scopes=[Scope.OPERATOR], key_id="key_op", secret=OPERATOR)
    issue_key(store, "acme", scopes=[Scope.READ], key_id="key_reader", secret=READER)
    issue_key(store, "acme", scopes=[Scope.INGEST], key_id="key_gone", secret=REVOKED)
    store.revoke_key("key_gone")
    return store


def _routed(app: FastAPI) -> FastAPI:
    """The app with its short road taken out (before its first request builds the stack)."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not FastRoute]
    return app


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    fast_store, routed_store = _store(tmp_path / "fast.db"), _store(tmp_path / "routed.db")
    fast = create_app(fast_store, now=Clock())
    assert any(m.cls is FastRoute for m in fast.user_middleware)
    routed = _routed(create_app(routed_store, now=Clock()))
    with TestClient(fast) as a, TestClient(routed) as b:
        yield a, b
    fast_store.close()
    routed_store.close()


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


OK = [event("e1", "acme", "lookups", "2025-01-02T10:00:00Z", tags=["a"])]
REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/events", {"json": OK, "headers": _bearer(OPERATOR)}),
    ("POST", "/v1/events", {"json": OK, "headers": _bearer(OPERATOR)}),  # a retry
    (  # the same id with another payload: a conflict
        "POST",
        "/v1/events",
        {"json": [{**OK[0], "value": 2}], "headers": _bearer(OPERATOR)},
    ),
    (
        "POST",
        "/v1/events",
        {
            "content": b'{"id":"n1","account":"acme","metric":"m","ts":1735812000000}\n',
            "headers": {**_bearer(OPERATOR), "Content-Type": "application/x-ndjson"},
        },
    ),
    ("POST", "/v1/events", {"content": b"[{", "headers": _bearer(OPERATOR)}),
    (
        "POST",
        "/v1/events",
        {
            "json": [event("x", "ghost", "lookups", "yesterday"), {"id": "y"}],
            "headers": _bearer(OPERATOR),
        },
    ),
    ("POST", "/v1/events", {"json": OK}),  # no key
    ("POST", "/v1/events", {"json": OK, "headers": {"Authorization": "Basic abc"}}),
    ("POST", "/v1/events", {"json": OK, "headers": _bearer("not_a_key")}),
    ("POST", "/v1/events", {"json": OK, "headers": _bearer(READER)}),  # no ingest scope
    ("POST", "/v1/events", {"json": OK, "headers": _bearer(REVOKED)}),
    ("GET", "/v1/events", {"headers": _bearer(OPERATOR)}),  # not this route: the router's
    ("POST", "/v1/events/", {"json": OK, "headers": _bearer(OPERATOR)}),
    ("POST", "/v1/events/void", {"json": {}, "headers": _bearer(OPERATOR)}),
]


def test_every_answer_is_the_routed_endpoints(clients: tuple[TestClient, TestClient]) -> None:
    fast, routed = clients
    for method, path, kwargs in REQUESTS:
        a = fast.request(method, path, follow_redirects=False, **kwargs)
        b = routed.request(method, path, follow_redirects=False, **kwargs)
        assert (a.status_code, a.headers, a.content) == (b.status_code, b.headers, b.content), (
            method,
            path,
            kwargs,
        )


def test_a_body_over_the_limit_is_refused_the_same_way(
    clients: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "MAX_BODY", 100)
    fast, routed = clients
    batch = [event(f"e{i}", "acme", "lookups", "2025-01-02T10:00:00Z") for i in range(5)]
    a = fast.post("/v1/events", json=batch, headers=_bearer(OPERATOR))
    b = routed.post("/v1/events", json=batch, headers=_bearer(OPERATOR))
    assert a.status_code == 413
    assert (a.headers, a.content) == (b.headers, b.content)


def test_requests_it_answers_are_counted_under_the_routes_template(
    clients: tuple[TestClient, TestClient],
) -> None:
    fast, _ = clients
    assert fast.post("/v1/events", json=OK, headers=_bearer(OPERATOR)).status_code == 200
    assert fast.post("/v1/events", json=OK).status_code == 401
    page = fast.get("/metrics", headers=_bearer(OPERATOR)).text
    for status in ("200", "401"):
        labels = f'method="POST",route="/v1/events",status="{status}"'
        assert f"usagemeter_http_requests_total{{{labels}}} 1.0" in page


def test_the_route_stays_documented(clients: tuple[TestClient, TestClient]) -> None:
    fast, _ = clients
    operation = fast.get("/openapi.json").json()["paths"]["/v1/events"]["post"]
    assert "application/x-ndjson" in operation["requestBody"]["content"]
