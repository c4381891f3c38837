"""Hostile bodies and query strings against the real app: never a 500, always a JSON error
that says what to fix, and a rejected batch leaves nothing behind."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Tenants
from usagemeter.store.sqlite import SQLiteStore

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Values that broke parsers before: other scripts' digits, huge and tiny numbers, dates at
# the ends of the calendar, separators, control characters, long runs.
NASTY_TEXT = st.sampled_from(
    [
        "",
        "²",
        "٣",
        "１",
        "9" * 5000,
        "-0",
        "1e400",
        "NaN",
        "Infinity",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59Z",
        "9999-12-31",
        "2025-01-15",
        "2025-01-15T10:00:00",
        "\x00",
        "a,b,,c",
        "=",
        "%",
        "%00",
        "../etc/passwd",
        "x" * 300,
        "key_root",
        "root",
    ]
)
TEXT = st.one_of(NASTY_TEXT, st.text(max_size=40))
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1.7e308, -1.7e308, 1e15, -1e15, 1e15 + 1, 5e-324, 2**63, -(2**63) - 1]),
)
JSON_LEAF = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
FIELDS = ["id", "account", "key", "metric", "ts", "value", "billable", "dimensions", "tags"]


@st.composite
def hostile_event(draw: Any) -> dict[str, Any]:
    """Mostly a plausible event, with some fields hostile and some missing or extra."""
    event: dict[str, Any] = {
        "id": draw(st.one_of(st.text(min_size=1, max_size=8), JSON)),
        "account": draw(st.one_of(st.sampled_from(["root", "child", "other", "nobody"]), JSON)),
        "metric": draw(st.one_of(st.just("m"), JSON)),
        "ts": draw(
            st.one_of(
                st.just("2025-01-02T00:00:00Z"),
                st.integers(min_value=1_700_000_000_000, max_value=1_800_000_000_000),
                JSON,
            )
        ),
    }
    for name in draw(st.lists(st.sampled_from([*FIELDS[5:], "key", "extra"]), max_size=3)):
        event[name] = draw(
            st.one_of(
                NUMBERS,
                st.dictionaries(st.text(max_size=8), st.one_of(TEXT, JSON), max_size=3),
                st.lists(TEXT, max_size=3),
                JSON,
            )
        )
    for name in draw(st.lists(st.sampled_from(FIELDS[:5]), max_size=1)):
        event.pop(name, None)
    return event


def deep(depth: int, where: str) -> str:
    if where == "array":
        return "[" * depth + "]" * depth
    inner = '{"a": ' * depth + "1" + "}" * depth
    return json.dumps([{"id": "d", "metric": "m", "ts": 1735776000000}])[:-2] + (
        f', "dimensions": {inner}}}]'
    )


BODIES = st.one_of(
    st.lists(hostile_event(), max_size=5).map(lambda events: json.dumps(events).encode()),
    hostile_event().map(lambda e: json.dumps(e).encode()),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    st.builds(deep, st.integers(1, 3000), st.sampled_from(["array", "dimensions"])).map(str.encode),
    st.lists(hostile_event(), max_size=5).map(
        lambda events: "\n".join(json.dumps(e) for e in events).encode()
    ),
)


def assert_our_error(response: Any) -> None:
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"} and error["message"], error


@FUZZ
@given(body=BODIES, ndjson=st.booleans())
def test_hostile_event_bodies(
    client: TestClient, store: SQLiteStore, tenants: Tenants, body: bytes, ndjson: bool
) -> None:
    before = store.count_events()
    content_type = "application/x-ndjson" if ndjson else "application/json"
    response = client.post(
        "/v1/events",
        content=body,
        headers={**tenants.headers("root"), "Content-Type": content_type},
    )
    assert response.status_code in (200, 400, 403), response.text
    if response.status_code == 200:
        result = response.json()
        assert store.count_events() == before + result["accepted"]
        return
    assert_our_error(response)
    assert store.count_events() == before  # nothing half-stored


PARAMS = {
    "/v1/query": [
        "metric",
        "account",
        "start",
        "end",
        "granularity",
        "tz",
        "group_by",
        "filter",
        "tags",
        "billable",
        "key",
        "aggregation",
        "limit",
        "include_subaccounts",
    ],
    "/analytics/detail-usage-time": ["timePeriod", "account"],
    "/keys/key_root/usage": ["start", "end", "tags", "licensee", "user_token"],
    "/v1/account/usage/": ["start_date", "end_date", "account"],
    "/v1/usage": ["startDate", "endDate", "metric", "account"],
    "/v1/accounts/root/analytics/usage": ["start", "end", "granularity", "group_by", "tz", "limit"],
    "/v1/accounts": ["x"],
    "/v1/accounts/root/keys": ["x"],
}


@st.composite
def query_string(draw: Any) -> tuple[str, list[tuple[str, str]]]:
    path = draw(st.sampled_from(sorted(PARAMS)))
    names = st.one_of(st.sampled_from(PARAMS[path]), st.text(max_size=10))
    pairs = draw(st.lists(st.tuples(names, TEXT), max_size=8))
    if draw(st.booleans()):  # many repeats of one parameter
        name = draw(st.sampled_from(PARAMS[path]))
        value = draw(st.text(max_size=12))  # short: the count is the point here
        pairs += [(name, value)] * draw(st.integers(20, 400))
    return path, pairs


@FUZZ
@given(request=query_string())
def test_hostile_query_strings(
    client: TestClient, tenants: Tenants, request: tuple[str, list[tuple[str, str]]]
) -> None:
    path, pairs = request
    secret = tenants.secrets["root"]
    headers = {
        "Authorization": f"Bearer {secret}",
        "X-Api-Key": secret,
        "x-api-version": "2025-09",
    }
    response = client.get(path, params=pairs, headers=headers)
    assert response.status_code < 500, (path, pairs[:5], response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    native = path.startswith(("/v1/query", "/v1/accounts")) and "/analytics/" not in path
    if native and response.status_code >= 400:
        assert_our_error(response)


ACCOUNT_OR_KEY = st.fixed_dictionaries(
    {},
    optional={
        "name": TEXT,
        "id": TEXT,
        "parent_id": TEXT,
        "prefix": TEXT,
        "scopes": st.one_of(st.lists(TEXT, max_size=3), JSON),
        "billing_cycle": st.one_of(
            st.fixed_dictionaries({}, optional={"anchor": TEXT, "period": TEXT}), JSON
        ),
        "extra": JSON,
    },
).map(lambda body: json.dumps(body).encode())


@FUZZ
@given(
    path=st.sampled_from(["/v1/accounts", "/v1/accounts/root/keys", "/v1/accounts/nobody/keys"]),
    body=st.one_of(ACCOUNT_OR_KEY, BODIES),
    who=st.sampled_from(["operator", "root"]),
)
def test_hostile_account_and_key_bodies(
    client: TestClient,
    tenants: Tenants,
    operator_secret: str,
    path: str,
    body: bytes,
    who: str,
) -> None:
    secret = operator_secret if who == "operator" else tenants.secrets["root"]
    response = client.post(path, content=body, headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code in (201, 400, 403, 404, 409, 413), response.text
    if response.status_code != 201:
        assert_our_error(response)
