"""Hostile input answered with a 400 that says what to fix (issue 12, items 6-10 and 14)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Tenants, event
from usagemeter.api.params import ascii_int
from usagemeter.ingest import MAX_VALUE

NDJSON = {"Content-Type": "application/x-ndjson"}
Q = {"metric": "m", "account": "root"}


def query(client: TestClient, op: dict[str, str], **params: Any) -> Any:
    return client.get("/v1/query", params={**Q, **params}, headers=op)


def messages(response: Any) -> str:
    assert response.headers["content-type"] == "application/json"
    return str(response.json()["error"]["message"])


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("9999-12-31T00:00:00Z", "9999-12-31T23:59:59Z"),
        ("0001-01-01T00:00:00+14:00", "2025-01-01T00:00:00Z"),
        ("0001-01-01", "0001-01-02"),
        ("2025-01-01", "9999-12-31T23:59:59+14:00"),
        ("-62135596800000", "253402300799999"),
    ],
)
def test_ranges_past_the_supported_bounds_are_a_400(
    client: TestClient, op: dict[str, str], tenants: Tenants, start: str, end: str
) -> None:
    """Item 6: OverflowError (500) at year 9999, and at year 1 with +14:00."""
    response = query(client, op, start=start, end=end)
    assert response.status_code == 400, response.text
    assert "1970-01-01T00:00:00Z to 2200-01-01T00:00:00Z" in messages(response)


def test_an_end_at_year_one_with_the_default_start_is_a_400(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    response = query(client, op, end="0001-01-01T00:00:00-14:00")
    assert response.status_code == 400 and "supported range" in messages(response)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("body", "ndjson"),
    [
        (nested(1000), False),
        (
            "["
            + json.dumps(event("e", "root", "m", 1735776000000))[:-1]
            + ', "value": '
            + nested(1000)
            + "}]",
            False,
        ),
        ('{"id": "e", "dimensions": {"a": ' + '{"b": ' * 1000 + "1" + "}" * 1001 + "}", False),
        (nested(1000) + "\n", True),
        (json.dumps(event("e", "root", "m", 1735776000000)) + "\n" + nested(5000), True),
    ],
)
def test_deep_json_is_a_400(
    client: TestClient, op: dict[str, str], tenants: Tenants, body: str, ndjson: bool
) -> None:
    """Item 7: JSON nested ~1,000 deep (array, NDJSON, dimensions) raised RecursionError."""
    headers = {**op, **(NDJSON if ndjson else {})}
    response = client.post("/v1/events", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert "nested deeper" in messages(response)
    assert query(client, op, start="2024-12-01", granularity="total").json()["total"] == 0


def test_brackets_inside_strings_are_not_nesting(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    deep_text = "[" * 50 + '\\"{' * 20
    batch = [event("e", "root", "m", "2025-01-02T00:00:00Z", dimensions={"note": deep_text})]
    response = client.post("/v1/events", json=batch, headers=op)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("limit", ["²", "٣", "１", "9" * 5000, "1_0", " 5x", "0x10", "+"])
def test_integer_parameters_are_ascii_digits(
    client: TestClient, op: dict[str, str], tenants: Tenants, limit: str
) -> None:
    """Item 8: ``limit=²`` and a 5,000-digit limit answered 500."""
    native = query(client, op, start="2025-01-01", end="2025-01-03", limit=limit)
    assert native.status_code == 400 and "limit" in messages(native)
    analytics = client.get(
        "/v1/accounts/root/analytics/usage", params={"limit": limit}, headers={"X-API-Key": ""}
    )
    assert analytics.status_code in (400, 401, 403, 422)


def test_analytics_limit_is_strict(client: TestClient, op: dict[str, str], tenants: Tenants):
    headers = {"X-API-Key": op["Authorization"].split()[1]}
    for limit in ("9" * 5000, "²", "٣"):
        response = client.get(
            "/v1/accounts/root/analytics/usage", params={"limit": limit}, headers=headers
        )
        assert response.status_code == 422, (limit, response.text)
        assert response.json()["detail"][0]["loc"] == ["query", "limit"]


def test_key_usage_times_are_ascii_digits(client: TestClient, tenants: Tenants) -> None:
    response = client.get(
        "/keys/key_root/usage", params={"start": "١٧٣٥٧٧٦٠٠٠٠٠٠"}, headers=tenants.headers("root")
    )
    assert response.status_code == 400 and "not an integer" in response.json()["message"]


def test_ascii_int() -> None:
    assert ascii_int("42") == 42 and ascii_int(" -7 ") == -7 and ascii_int("007") == 7
    assert ascii_int("9" * 5000) == 10**18 and ascii_int("-" + "9" * 30) == -(10**18)
    for bad in ("", "²", "٣", "1_000", "1.0", "1e3", "--1", "+"):
        assert ascii_int(bad) is None


def test_too_many_filters_and_group_bys_are_a_400(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    """Item 9: 1,000 ``filter=`` parameters: "Expression tree is too large" (500)."""
    params = [*Q.items(), *[("filter", f"d{i}=x") for i in range(1000)]]
    response = client.get("/v1/query", params=params, headers=op)
    assert response.status_code == 400 and "at most 20 filter" in messages(response)
    many = ",".join(f"d{i}" for i in range(1000))
    response = query(client, op, group_by=many)
    assert response.status_code == 400 and "at most 8 dimensions" in messages(response)
    response = query(client, op, tags=many)
    assert response.status_code == 400 and "at most 20 tags" in messages(response)


def test_values_beyond_the_bound_are_rejected_and_slots_stay_writable(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    """Item 10: two 1.7e308 were accepted, the total read null, and every later event in that
    15-minute slot failed with NOT NULL constraint failed: rollup.total (500)."""
    ts = "2025-01-02T00:00:00Z"
    huge = [event("a", "root", "m", ts, value=1.7e308), event("b", "root", "m", ts, value=1.7e308)]
    response = client.post("/v1/events", json=huge, headers=op)
    assert response.status_code == 400
    assert f"±{MAX_VALUE:g}" in messages(response)
    for body in (
        f'[{{"id": "c", "account": "root", "metric": "m", "ts": "{ts}", "value": 1e999}}]',
        f'{{"id": "n", "account": "root", "metric": "m", "ts": "{ts}", "value": 1e16}}\n',
    ):
        ndjson = NDJSON if body.endswith("\n") else {}
        assert client.post("/v1/events", content=body, headers={**op, **ndjson}).status_code == 400
    # At the bound, both signs, in one slot: accepted, and the slot keeps taking events.
    edge = [event("p", "root", "m", ts, value=MAX_VALUE), event("q", "root", "m", ts, value=-1e15)]
    assert client.post("/v1/events", json=edge, headers=op).status_code == 200
    later = [event("r", "root", "m", ts, value=2.5)]
    assert client.post("/v1/events", json=later, headers=op).status_code == 200
    total = query(client, op, start="2025-01-02", end="2025-01-03", granularity="total")
    assert total.json()["total"] == 2.5


@pytest.mark.parametrize("ts", ["2025-01-15", "2025-01-15T10:00:00", "2025-01-15 10:00"])
def test_ts_without_an_offset_is_rejected_on_both_paths(
    client: TestClient, op: dict[str, str], tenants: Tenants, ts: str
) -> None:
    """Item 14: a bare date or a date-time without an offset was read as UTC."""
    clean = [event("e", "root", "m", ts)]  # the fast path's shape, but for ts
    messy = [event("e", "root", "m", ts, dimensions={"n": 5})]  # forces the slow path
    for batch in (clean, messy):
        response = client.post("/v1/events", json=batch, headers=op)
        assert response.status_code == 400, response.text
        error = response.json()["error"]["details"]["errors"][0]
        assert error["field"] == "ts" and "no UTC offset" in error["message"]
    for ok in ("2025-01-15T10:00:00Z", "2025-01-15T10:00:00+05:30", 1736935200000):
        batch = [event(f"ok-{ok}", "root", "m", ok)]
        assert client.post("/v1/events", json=batch, headers=op).status_code == 200


def test_account_and_key_bodies_are_small(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    huge = json.dumps({"name": "x" * 100_000}).encode()
    for path in ("/v1/accounts", "/v1/accounts/root/keys"):
        response = client.post(path, content=huge, headers=op)
        assert response.status_code == 413 and "at most 65536 bytes" in messages(response)
        long_name = client.post(path, json={"name": "x" * 201}, headers=op)
        assert long_name.status_code == 400 and "200 characters" in messages(long_name)
