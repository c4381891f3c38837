"""Meters: the defaults, and a file that overrides them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Clock, Tenants, event
from usagemeter.api.app import create_app
from usagemeter.meters import DEFAULT_METERS, MeterRegistry, parse_aggregation
from usagemeter.model import Aggregation, Meter
from usagemeter.store.sqlite import SQLiteStore


def test_defaults_serve_the_seed_endpoints() -> None:
    meters = MeterRegistry()
    assert meters.get("Sessions") == Meter("Sessions", Aggregation.UNIQUE_COUNT, "session_id")
    assert meters.get("StorageBytes").aggregation is Aggregation.LATEST
    assert meters.get("lookups").aggregation is Aggregation.COUNT
    assert meters.get("anything-else") == Meter("anything-else", Aggregation.SUM)
    assert len(meters.all()) == len(DEFAULT_METERS)


def test_parse_aggregation() -> None:
    assert parse_aggregation("unique_count(user_id)") == (Aggregation.UNIQUE_COUNT, "user_id")
    assert parse_aggregation(" max ") == (Aggregation.MAX, None)
    for bad in ("median", "unique_count", "unique_count()"):
        with pytest.raises(ValueError):
            parse_aggregation(bad)


def test_a_meters_file_overrides_and_adds(
    tmp_path: Path, store: SQLiteStore, tenants: Tenants, clock: Clock, op: dict[str, str]
) -> None:
    path = tmp_path / "meters.json"
    path.write_text(
        json.dumps(
            {
                "meters": [
                    {"metric": "lookups", "aggregation": "sum"},
                    {"metric": "users", "aggregation": "unique_count(user_id)"},
                ]
            }
        )
    )
    meters = MeterRegistry.from_file(path)
    assert meters.get("lookups").aggregation is Aggregation.SUM
    assert meters.get("Sessions").aggregation is Aggregation.UNIQUE_COUNT  # defaults remain
    with TestClient(create_app(store, meters, now=clock)) as client:
        sent = [
            event("1", "root", "users", "2025-03-01T00:00:00Z", dimensions={"user_id": "u1"}),
            event("2", "root", "users", "2025-03-02T00:00:00Z", dimensions={"user_id": "u1"}),
            event("3", "root", "users", "2025-03-02T00:00:00Z", dimensions={"user_id": "u2"}),
            event("4", "root", "lookups", "2025-03-02T00:00:00Z", value=5),
        ]
        assert client.post("/v1/events", json=sent, headers=op).status_code == 200
        query = {"account": "root", "start": "2025-03-01", "end": "2025-03-03"}
        users = client.get("/v1/query", params={**query, "metric": "users"}, headers=op).json()
        assert users["aggregation"] == "unique_count"
        assert [b["groups"][0]["value"] for b in users["buckets"]] == [1, 2]
        assert users["total"] == 2
        lookups = client.get("/v1/query", params={**query, "metric": "lookups"}, headers=op)
        assert lookups.json()["total"] == 5


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"meters": {}}),
        json.dumps({"meters": [{"aggregation": "sum"}]}),
        json.dumps({"meters": [{"metric": "m", "aggregation": "median"}]}),
        json.dumps({"meters": [{"metric": "m", "aggregation": "sum", "dimension": "x"}]}),
    ],
)
def test_a_bad_meters_file_says_what_is_wrong(tmp_path: Path, content: str) -> None:
    path = tmp_path / "meters.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="meters"):
        MeterRegistry.from_file(path)
