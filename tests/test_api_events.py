"""POST /v1/events: whole batches or nothing, every bad event named, retries counted once."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import Tenants, event


def _total(
    client: TestClient, headers: dict[str, str], account: str, metric: str = "lookups"
) -> Any:
    response = client.get(
        "/v1/query",
        params={"metric": metric, "account": account, "start": "2025-01-01", "end": "2025-02-01"},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    return response.json()["total"]


def test_accepts_then_counts_a_retry_once(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    batch = [event(f"e{i}", "root", "lookups", f"2025-01-0{i + 1}T10:00:00Z") for i in range(3)]
    first = client.post("/v1/events", json=batch, headers=op)
    assert first.json() == {"accepted": 3, "duplicates": 0, "conflicts": 0, "conflicting": []}
    retry = client.post(
        "/v1/events", json=[*batch, event("e9", "root", "lookups", 1735725600000)], headers=op
    )
    assert retry.json() == {"accepted": 1, "duplicates": 3, "conflicts": 0, "conflicting": []}
    assert _total(client, op, "root") == 4


def test_a_bad_event_rejects_the_whole_batch_naming_each(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    batch = [
        event("ok", "root", "lookups", "2025-01-02T00:00:00Z"),
        {"account": "root", "metric": "lookups", "ts": "2025-01-02T00:00:00Z"},  # no id
        event("bad-ts", "root", "lookups", "yesterday"),
        event("bad-value", "root", "lookups", "2025-01-02T00:00:00Z", value="three"),
        event("no-account", "ghost", "lookups", "2025-01-02T00:00:00Z"),
        event("typo", "root", "lookups", "2025-01-02T00:00:00Z", timestamp=1),
        event("seconds", "root", "lookups", 1735776000),
        event("dims", "root", "lookups", "2025-01-02T00:00:00Z", dimensions={"a": ["x"]}),
        event("tags", "root", "lookups", "2025-01-02T00:00:00Z", tags="foo"),
        event("key", "root", "lookups", "2025-01-02T00:00:00Z", key="key_other"),
    ]
    response = client.post("/v1/events", json=batch, headers=op)
    assert response.status_code == 400
    body = response.json()["error"]
    assert body["code"] == "invalid_events"
    errors = {e["index"]: e for e in body["details"]["errors"]}
    assert sorted(errors) == list(range(1, 10))
    assert errors[1]["field"] == "id"
    assert errors[2]["field"] == "ts"
    assert errors[3]["field"] == "value"
    assert "does not exist" in errors[4]["message"]
    assert "timestamp" in errors[5]["message"]
    assert "milliseconds" in errors[6]["message"]
    assert errors[7]["field"] == "dimensions"
    assert errors[8]["field"] == "tags"
    assert errors[9]["message"] == "key: 'key_other' is not a key of account 'root'"
    # Nothing of it was stored, not even the good first event.
    assert _total(client, op, "root") == 0


def test_ndjson_and_single_object(client: TestClient, op: dict[str, str], tenants: Tenants) -> None:
    lines = "\n".join(
        f'{{"id": "n{i}", "account": "root", "metric": "lookups", "ts": "2025-01-05T00:00:0{i}Z"}}'
        for i in range(4)
    )
    response = client.post(
        "/v1/events", content=lines + "\n", headers={**op, "Content-Type": "application/x-ndjson"}
    )
    assert response.json() == {"accepted": 4, "duplicates": 0, "conflicts": 0, "conflicting": []}
    single = client.post(
        "/v1/events", json=event("s1", "root", "lookups", "2025-01-06T00:00:00Z"), headers=op
    )
    assert single.json() == {"accepted": 1, "duplicates": 0, "conflicts": 0, "conflicting": []}
    assert _total(client, op, "root") == 5


def test_malformed_bodies_get_clear_errors(client: TestClient, op: dict[str, str]) -> None:
    not_json = client.post(
        "/v1/events", content=b"{nope", headers={**op, "Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == "invalid_json"
    scalar = client.post("/v1/events", json=42, headers=op)
    assert scalar.status_code == 400
    bad_line = client.post(
        "/v1/events",
        content=b'{"id": 1}\n{oops',
        headers={**op, "Content-Type": "application/x-ndjson"},
    )
    assert bad_line.status_code == 400
    assert "line 2" in bad_line.json()["error"]["message"]


def test_who_may_ingest(client: TestClient, tenants: Tenants, store: Any) -> None:
    from usagemeter.auth import issue_key
    from usagemeter.model import Scope

    e = event("x1", "child", "lookups", "2025-01-02T00:00:00Z")
    assert client.post("/v1/events", json=[e]).status_code == 401
    # An ingest key sends for its own account, and may leave the account out.
    own = client.post("/v1/events", json=[e], headers=tenants.headers("child"))
    assert own.json() == {"accepted": 1, "duplicates": 0, "conflicts": 0, "conflicting": []}
    implicit = {
        k: v
        for k, v in event("x2", "child", "lookups", "2025-01-02T00:00:00Z").items()
        if k != "account"
    }
    assert (
        client.post("/v1/events", json=[implicit], headers=tenants.headers("child")).status_code
        == 200
    )
    # Not for another account, not even its child.
    other = client.post(
        "/v1/events",
        json=[event("x3", "grandchild", "lookups", 1735776000000)],
        headers=tenants.headers("child"),
    )
    assert other.status_code == 400
    assert "may not send events" in other.json()["error"]["details"]["errors"][0]["message"]
    # A read-only key may not ingest at all.
    _, secret = issue_key(store, "child", scopes=[Scope.READ])
    read_only = client.post("/v1/events", json=[e], headers={"Authorization": f"Bearer {secret}"})
    assert read_only.status_code == 403


def test_event_naming_its_key(client: TestClient, op: dict[str, str], tenants: Tenants) -> None:
    e = event("k1", "root", "lookups", "2025-01-02T00:00:00Z", key="key_root")
    assert client.post("/v1/events", json=[e], headers=op).status_code == 200
    response = client.get(
        "/v1/query",
        params={
            "metric": "lookups",
            "account": "root",
            "key": "key_root",
            "start": "2025-01-01",
            "end": "2025-01-03",
            "granularity": "total",
        },
        headers=op,
    )
    assert response.json()["total"] == 1


def test_a_repeated_id_with_another_payload_is_a_reported_duplicate(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    first = event("c1", "root", "lookups", "2025-01-02T00:00:00Z", dimensions={"licensee": "a"})
    assert client.post("/v1/events", json=[first], headers=op).status_code == 200
    changed = {**first, "ts": "2025-01-03T00:00:00Z"}
    repeat = [
        first,  # the same payload: a plain duplicate
        changed,  # another ts: a conflict
        event("c2", "root", "lookups", "2025-01-02T00:00:00Z"),
        event("c2", "root", "lookups", "2025-01-02T00:00:00Z", value=5),  # in-batch conflict
        event("c2", "root", "lookups", "2025-01-02T00:00:00Z"),  # repeats c2 as first sent
    ]
    response = client.post("/v1/events", json=repeat, headers=op)
    assert response.status_code == 200
    assert response.json() == {
        "accepted": 1,
        "duplicates": 4,
        "conflicts": 2,
        "conflicting": [{"index": 1, "id": "c1"}, {"index": 3, "id": "c2"}],
    }
    # Counted once each, as first received: c1 on January 2nd, not the 3rd.
    day = client.get(
        "/v1/query",
        params={"metric": "lookups", "account": "root", "start": "2025-01-02", "end": "2025-01-03"},
        headers=op,
    )
    assert day.json()["total"] == 2
    assert _total(client, op, "root") == 2
