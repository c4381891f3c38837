"""Issue 11.7 and 11.10: what the native query refuses or flags, and GET /v1/metrics."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import Tenants, event


def test_unknown_query_parameters_are_named_with_the_closest_one(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    response = client.get(
        "/v1/query",
        params={"metric": "m", "account": "root", "granularty": "hour", "zzz": "1"},
        headers=op,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unknown_parameter"
    assert error["details"]["errors"] == [
        {"param": "granularty", "message": "unknown parameter; did you mean 'granularity'?"},
        {"param": "zzz", "message": "unknown parameter"},
    ]


def test_a_metric_never_seen_is_flagged(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any
) -> None:
    send(event("a", "root", "lookups", "2025-01-02T00:00:00Z"))
    params = {"account": "root", "start": "2025-01-01", "end": "2025-01-03"}
    typo = client.get("/v1/query", params={**params, "metric": "lookup"}, headers=op).json()
    assert typo["metric_seen"] is False and "GET /v1/metrics" in typo["notice"]
    right = client.get("/v1/query", params={**params, "metric": "lookups"}, headers=op).json()
    assert right["metric_seen"] is True and "notice" not in right and right["total"] == 1
    # Seen, but not in this range: zeros, and no notice.
    params = {"account": "root", "start": "2025-02-01", "end": "2025-02-03", "metric": "lookups"}
    idle = client.get("/v1/query", params=params, headers=op).json()
    assert idle["metric_seen"] is True and idle["total"] == 0
    # Another tenant's metric is not "seen" for this one.
    send(event("b", "other", "secret_metric", "2025-01-02T00:00:00Z"))
    other = client.get(
        "/v1/query", params={**params, "metric": "secret_metric"}, headers=tenants.headers("root")
    ).json()
    assert other["metric_seen"] is False


def test_metrics_lists_what_the_account_has_with_meters_and_dimensions(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any
) -> None:
    send(
        event("a", "root", "lookups", "2025-01-02T00:00:00Z", dimensions={"licensee": "l"}),
        event("b", "child", "Sessions", "2025-01-02T00:00:00Z", dimensions={"session_id": "s"}),
        event("c", "child", "lookups", "2025-01-03T00:00:00Z", dimensions={"agent": "x"}),
        event("d", "other", "tokens", "2025-01-02T00:00:00Z", dimensions={"model": "m"}),
    )
    root = client.get("/v1/metrics", headers=tenants.headers("root")).json()
    assert root["metrics"] == [
        {"metric": "Sessions", "meter": "unique_count(session_id)", "dimensions": ["session_id"]},
        {"metric": "lookups", "meter": "count", "dimensions": ["agent", "licensee"]},
    ]
    alone = client.get(
        "/v1/metrics", params={"account": "root", "include_subaccounts": "false"}, headers=op
    ).json()
    assert alone["metrics"] == [{"metric": "lookups", "meter": "count", "dimensions": ["licensee"]}]
    assert client.get("/v1/metrics", headers=tenants.headers("sibling")).json()["metrics"] == []
    # Another tenant's account is not found, as everywhere.
    hidden = client.get("/v1/metrics", params={"account": "other"}, headers=tenants.headers("root"))
    assert hidden.status_code == 404
    assert client.get("/v1/metrics", headers=op).status_code == 400
    assert client.get("/v1/metrics", params={"acount": "root"}, headers=op).status_code == 400


def test_a_limited_answer_says_it_is_truncated_and_where_to_go_on(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any
) -> None:
    send(*(event(f"e{d}", "root", "m", f"2025-01-{d:02d}T12:00:00Z") for d in range(1, 11)))
    params = {"account": "root", "metric": "m", "start": "2025-01-01", "end": "2025-01-11"}
    first = client.get("/v1/query", params={**params, "limit": "7"}, headers=op).json()
    assert len(first["buckets"]) == 7 and first["total"] == 7
    assert first["truncated"] is True and first["next_start"] == "2025-01-08T00:00:00Z"
    rest = client.get(
        "/v1/query", params={**params, "limit": "7", "start": first["next_start"]}, headers=op
    ).json()
    assert len(rest["buckets"]) == 3 and rest["total"] == 3
    assert rest["truncated"] is False and rest["next_start"] is None
    whole = client.get("/v1/query", params={**params, "limit": "10"}, headers=op).json()
    assert whole["truncated"] is False
