"""Issue 11.8: timestamps too far ahead of the clock, and negative values where the meter does
not take them, are refused on both paths (the typed fast path and the item-by-item one)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import Tenants, event
from usagemeter.api.app import create_app
from usagemeter.ingest import BatchRejected, Ingestor
from usagemeter.meters import MeterRegistry
from usagemeter.store.sqlite import SQLiteStore

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)

STORED_TWO = {"accepted": 2, "duplicates": 0, "conflicts": 0, "conflicting": []}


def _post(
    client: TestClient, op: dict[str, str], *events: dict[str, Any], ndjson: bool = False
) -> httpx.Response:
    if ndjson:
        body = "\n".join(json.dumps(e) for e in events)
        headers = {**op, "Content-Type": "application/x-ndjson"}
        return client.post("/v1/events", content=body, headers=headers)
    return client.post("/v1/events", json=list(events), headers=op)


@pytest.mark.parametrize("ndjson", [False, True])
def test_a_timestamp_a_day_ahead_is_refused_and_any_past_one_kept(
    client: TestClient, op: dict[str, str], tenants: Tenants, ndjson: bool
) -> None:
    # The server's wall clock decides (the test clock pins only report defaults).
    now = datetime.now(UTC)
    soon = event("soon", "root", "lookups", (now + timedelta(hours=23)).isoformat())
    old = event("old", "root", "lookups", "2001-02-03T04:05:06Z")
    ahead = event("ahead", "root", "lookups", int((now + timedelta(hours=25)).timestamp() * 1000))
    # A clean batch goes down the fast path: the rule holds there too.
    refused = _post(client, op, ahead, ndjson=ndjson)
    assert refused.status_code == 400
    [error] = refused.json()["error"]["details"]["errors"]
    assert error["index"] == 0 and error["field"] == "ts"
    assert "more than 24 hours ahead of the server's clock" in error["message"]
    mixed = _post(client, op, soon, old, ahead, ndjson=ndjson)
    assert [e["index"] for e in mixed.json()["error"]["details"]["errors"]] == [2]
    assert _post(client, op, soon, old, ndjson=ndjson).json() == STORED_TWO


def test_the_future_limit_is_configurable(store: SQLiteStore, tenants: Tenants) -> None:
    ingestor = Ingestor(store, max_future=timedelta(minutes=5), now=lambda: NOW)
    fine = event("a", "root", "m", (NOW + timedelta(minutes=4)).isoformat())
    late = event("b", "root", "m", (NOW + timedelta(minutes=6)).isoformat())
    assert ingestor.ingest([fine]).accepted == 1
    with pytest.raises(BatchRejected, match="5 minutes ahead"):
        ingestor.ingest([late])
    body = json.dumps([late]).encode()
    with pytest.raises(BatchRejected):
        ingestor.ingest_json(body, False, None)
    with pytest.raises(ValueError, match="max_future"):
        Ingestor(store, max_future=timedelta(hours=-1))


@pytest.mark.parametrize("ndjson", [False, True])
def test_negative_values_only_where_the_meter_takes_them(
    client: TestClient, op: dict[str, str], tenants: Tenants, ndjson: bool
) -> None:
    at = "2025-01-02T00:00:00Z"
    for metric in ("lookups", "Sessions"):  # count, unique_count: refused
        response = _post(
            client, op, event(f"n-{metric}", "root", metric, at, value=-1), ndjson=ndjson
        )
        assert response.status_code == 400, metric
        [error] = response.json()["error"]["details"]["errors"]
        assert error["field"] == "value" and "allow_negative" in error["message"]
    # A sum (a refund, a credit) and a gauge take them.
    ok = _post(
        client,
        op,
        event("credit", "root", "ApiCalls", at, value=-5),
        event("gauge", "root", "StorageBytes", at, value=-1),
        ndjson=ndjson,
    )
    assert ok.json() == STORED_TWO


def test_a_meters_file_sets_allow_negative(
    tmp_path: Path, store: SQLiteStore, tenants: Tenants, op: dict[str, str]
) -> None:
    path = tmp_path / "meters.json"
    path.write_text(
        json.dumps(
            {
                "meters": [
                    {"metric": "lookups", "aggregation": "count", "allow_negative": True},
                    {"metric": "tokens", "aggregation": "sum", "allow_negative": False},
                ]
            }
        )
    )
    app = create_app(store, MeterRegistry.from_file(path))
    at = "2025-01-02T00:00:00Z"
    with TestClient(app) as client:
        assert _post(client, op, event("a", "root", "lookups", at, value=-1)).status_code == 200
        refused = _post(client, op, event("b", "root", "tokens", at, value=-1))
        assert refused.status_code == 400 and "'tokens'" in refused.text
    path.write_text(json.dumps({"meters": [{"metric": "x", "allow_negative": "yes"}]}))
    with pytest.raises(ValueError, match="allow_negative"):
        MeterRegistry.from_file(path)


@pytest.mark.parametrize("ndjson", [False, True])
def test_a_nul_character_is_refused_by_every_store_naming_the_field(
    client: TestClient, op: dict[str, str], tenants: Tenants, ndjson: bool
) -> None:
    """Regression: U+0000 in an event's text was stored by SQLite and ClickHouse and refused
    only by PostgreSQL, so a file one store took could not move to another (`migrate`)."""
    ts = "2025-05-01T00:00:00Z"
    good = event("good", "root", "lookups", ts)
    bads = [
        (event("a\u0000b", "root", "lookups", ts), "id"),
        ({**event("d", "root", "lookups", ts), "dimensions": {"agent": "x\u0000"}}, "dimensions"),
        ({**event("t", "root", "lookups", ts), "tags": ["t\u0000"]}, "tags"),
        (event("k", "root\u0000", "lookups", ts), "account"),
    ]
    for bad, field in bads:
        refused = _post(client, op, good, bad, ndjson=ndjson)
        assert refused.status_code == 400, refused.text
        [error] = refused.json()["error"]["details"]["errors"]
        assert error["index"] == 1 and error["field"] == field, error
        assert "contains a NUL character" in error["message"]
    # A backslash and "u0000" written as text is no NUL: it is kept as sent.
    literal = event("back\\u0000slash", "root", "lookups", ts)
    assert _post(client, op, good, literal, ndjson=ndjson).json() == STORED_TWO


def test_parsed_records_with_a_nul_character_are_refused(
    store: SQLiteStore, tenants: Tenants
) -> None:
    """The records path (a CSV file's rows, the peers' APIs) has no JSON body to look at."""
    ingestor = Ingestor(store)
    bad = {**event("a", "root", "m", "2025-05-01T00:00:00Z"), "dimensions": {"x": "\u0000"}}
    with pytest.raises(BatchRejected) as refused:
        ingestor.ingest([event("b", "root", "m", "2025-05-01T00:00:00Z"), bad])
    assert [(e.index, e.field) for e in refused.value.errors] == [(1, "dimensions")]
    assert store.count_events() == 0


def test_account_and_key_names_with_a_nul_character_are_refused(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    made = client.post("/v1/accounts", json={"id": "nul", "name": "N\u0000"}, headers=op)
    assert made.status_code == 400 and "NUL character" in made.text, made.text
    key = client.post("/v1/accounts/root/keys", json={"name": "k\u0000"}, headers=op)
    assert key.status_code == 400 and "NUL character" in key.text, key.text
