"""GET /v1/query: the engine's whole surface over HTTP, and its errors."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import Clock, Tenants, event


def _q(client: TestClient, op: dict[str, str], **params: Any) -> Any:
    response = client.get("/v1/query", params={"account": "root", **params}, headers=op)
    assert response.status_code == 200, response.text
    return response.json()


def test_new_york_days_across_the_dst_change(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any
) -> None:
    # 2024-11-03 is 25 hours long in New York; both 01:30 local times land on that day.
    send(
        event("a", "root", "m", "2024-11-03T05:30:00Z"),  # 01:30 EDT
        event("b", "root", "m", "2024-11-03T06:30:00Z"),  # 01:30 EST
        event("c", "root", "m", "2024-11-04T04:30:00Z"),  # 23:30 EST on the 3rd
        event("d", "root", "m", "2024-11-04T05:30:00Z"),  # 00:30 on the 4th
    )
    body = _q(
        client,
        op,
        metric="m",
        start="2024-11-03T00:00:00-04:00",
        end="2024-11-05T00:00:00-05:00",
        tz="America/New_York",
    )
    assert [(b["start"], b["end"]) for b in body["buckets"]] == [
        ("2024-11-03T00:00:00-04:00", "2024-11-04T00:00:00-05:00"),
        ("2024-11-04T00:00:00-05:00", "2024-11-05T00:00:00-05:00"),
    ]
    assert [b["groups"][0]["value"] for b in body["buckets"]] == [3, 1]
    hours = _q(
        client,
        op,
        metric="m",
        start="2024-11-03T05:00:00Z",
        end="2024-11-03T07:00:00Z",
        tz="America/New_York",
        granularity="hour",
    )
    assert [b["start"] for b in hours["buckets"]] == [
        "2024-11-03T01:00:00-04:00",
        "2024-11-03T01:00:00-05:00",
    ]
    assert [b["groups"][0]["value"] for b in hours["buckets"]] == [1, 1]


def test_groups_filters_tags_billable(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any
) -> None:
    send(
        event(
            "1",
            "root",
            "lookups",
            "2025-01-02T01:00:00Z",
            dimensions={"agent": "x"},
            tags=["a", "b"],
        ),
        event(
            "2",
            "root",
            "lookups",
            "2025-01-02T02:00:00Z",
            dimensions={"agent": "y"},
            tags=["a"],
            billable=False,
        ),
        event("3", "child", "lookups", "2025-01-02T03:00:00Z", dimensions={"agent": "x"}),
    )
    base = {"metric": "lookups", "start": "2025-01-01", "end": "2025-01-03", "granularity": "total"}
    grouped = _q(client, op, **base, group_by="agent,subaccount")
    assert [(t["group"], t["value"]) for t in grouped["totals"]] == [
        ({"agent": "x", "subaccount": "child"}, 1),
        ({"agent": "x", "subaccount": "root"}, 1),
        ({"agent": "y", "subaccount": "root"}, 1),
    ]
    assert _q(client, op, **base, filter="agent=x")["total"] == 2
    assert _q(client, op, **base, tags="a,b")["total"] == 1
    assert _q(client, op, **base, tags="a")["total"] == 2
    assert _q(client, op, **base, billable="true")["total"] == 2
    assert _q(client, op, **base, aggregation="max")["aggregation"] == "max"


def test_defaults_to_the_last_30_days(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any, clock: Clock
) -> None:
    send(
        event("1", "root", "m", "2025-03-01T00:00:00Z"),
        event("2", "root", "m", "2025-01-01T00:00:00Z"),
    )
    body = _q(client, op, metric="m")
    assert body["end"] == "2025-03-15T12:00:00Z"
    assert body["start"] == "2025-02-13T12:00:00Z"
    assert body["total"] == 1
    assert len(body["buckets"]) == 31  # 30 days from noon to noon touch 31 dates


def test_every_parameter_problem_at_once(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    response = client.get(
        "/v1/query",
        params={
            "tz": "Mars/Olympus",
            "granularity": "week",
            "start": "soon",
            "limit": "0",
            "filter": "nodelimiter",
        },
        headers=op,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_query"
    params = sorted(e["param"] for e in error["details"]["errors"])
    assert params == ["account", "filter", "granularity", "limit", "metric", "start", "tz"]


def test_too_many_buckets_and_inverted_ranges(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    many = client.get(
        "/v1/query",
        params={
            "metric": "m",
            "account": "root",
            "start": "2000-01-01",
            "end": "2025-01-01",
            "granularity": "hour",
        },
        headers=op,
    )
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_buckets"
    inverted = client.get(
        "/v1/query",
        params={"metric": "m", "account": "root", "start": "2025-01-02", "end": "2025-01-01"},
        headers=op,
    )
    assert inverted.status_code == 400


def test_unknown_paths_and_methods_answer_json(client: TestClient) -> None:
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = client.put("/v1/events")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_openapi_lists_the_native_api(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/accounts",
        "/v1/accounts/{account_id}/keys",
        "/v1/keys/{key_id}",
        "/v1/events",
        "/v1/query",
        "/healthz",
    ):
        assert path in paths
    assert client.get("/docs").status_code == 200
