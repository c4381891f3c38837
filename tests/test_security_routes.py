"""Every route the app documents, fuzzed: hostile bodies, path parameters and query strings,
with an operator's key and an account's. A route added later is fuzzed too, because the list
comes from the OpenAPI document: whatever the route, a client never gets a 500, and always
gets JSON (our error shape on the native API; the seed and peer routes answer in their own)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import Tenants
from tests.test_security_fuzz import BODIES, FUZZ, JSON, TEXT, assert_our_error
from usagemeter.api.app import create_app
from usagemeter.store.sqlite import SQLiteStore

# Routes whose answers are not JSON: the docs pages.
NOT_JSON = ("/docs", "/redoc", "/openapi.json", "/dashboard")
# Routes that answer in a shape of their own (the seed contracts and the peers' APIs).
OWN_SHAPES = (
    "/openmeter/",
    "/lago/",
    "/stripe/",
    "/keys/",
    "/analytics/",
    "/v1/usage",
    "/v1/account/usage",
)


def _operations() -> list[tuple[str, str]]:
    """(method, path template) of every documented operation."""
    app = create_app(SQLiteStore(":memory:"))
    return sorted(
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if not path.startswith(NOT_JSON)
    )


OPERATIONS = _operations()
PATH_VALUES = st.one_of(st.sampled_from(["root", "child", "nobody", "m", "key_root"]), TEXT)
OBJECT_BODIES = st.dictionaries(
    st.one_of(
        st.sampled_from(
            [
                "account",
                "metric",
                "ids",
                "id",
                "start",
                "end",
                "reason",
                "value",
                "amount",
                "period",
                "thresholds",
                "action",
                "tz",
                "url",
                "metrics",
                "expires_in",
                "event",
                "events",
                "name",
                "scopes",
                "new_id",
                "dimensions",
            ]
        ),
        TEXT,
    ),
    JSON,
    max_size=6,
).map(lambda body: json.dumps(body).encode())


@st.composite
def request(draw: Any) -> tuple[str, str, list[tuple[str, str]], bytes, str]:
    method, template = draw(st.sampled_from(OPERATIONS))
    path = template
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + quote(draw(PATH_VALUES), safe="") + path[end + 1 :]
    pairs = draw(st.lists(st.tuples(TEXT, TEXT), max_size=6))
    body = draw(st.one_of(OBJECT_BODIES, BODIES)) if method in ("POST", "PATCH") else b""
    content_type = draw(
        st.sampled_from(
            ["application/json", "application/x-www-form-urlencoded", "application/x-ndjson"]
        )
    )
    return method, path, pairs, body, content_type


@FUZZ
@given(call=request(), as_operator=st.booleans())
def test_no_route_answers_a_500_to_anything(
    client: TestClient,
    tenants: Tenants,
    operator_secret: str,
    call: tuple[str, str, list[tuple[str, str]], bytes, str],
    as_operator: bool,
) -> None:
    method, path, pairs, body, content_type = call
    secret = operator_secret if as_operator else tenants.secrets["root"]
    headers = {
        "Authorization": f"Bearer {secret}",
        "X-Api-Key": secret,
        "x-api-version": "2025-09",
        "Content-Type": content_type,
    }
    response = client.request(method, path, params=pairs, content=body, headers=headers)
    said = (method, path, pairs[:3], body[:200], response.text[:300])
    assert response.status_code < 500, said
    if response.status_code != 204:  # OpenMeter's ingest answers with no content
        assert "json" in response.headers["content-type"], said  # problem+json too
    if response.status_code >= 400 and not any(part in path for part in OWN_SHAPES):
        assert_our_error(response)


def test_a_nul_character_in_an_id_is_a_clear_400_or_not_found_on_every_store(
    client: TestClient, operator_secret: str
) -> None:
    """Regression: PostgreSQL's driver refuses text with U+0000, and each route that passed
    one to the store answered a 500. (SQLite and ClickHouse can hold such a name.)"""
    headers = {"Authorization": f"Bearer {operator_secret}"}
    calls = [
        ("DELETE", "/v1/accounts/a%00b", None),
        ("GET", "/v1/accounts/a%00b/limits", None),
        ("GET", "/v1/accounts/a%00b/keys", None),
        ("DELETE", "/v1/keys/k%00", None),
        ("POST", "/v1/accounts", {"id": "a\u0000b", "name": "N"}),
        ("POST", "/v1/accounts", {"id": "fine", "name": "N\u0000"}),
        ("POST", "/v1/webhooks", {"url": "http://127.0.0.1:9/\u0000"}),
    ]
    for method, path, body in calls:
        response = client.request(method, path, json=body, headers=headers)
        if response.status_code == 201 and "fine" in path + json.dumps(body):
            continue
        assert response.status_code in (400, 404), (method, path, response.text)
        assert_our_error(response)
