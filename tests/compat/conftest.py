"""A real server for the peers' clients: uvicorn on a free loopback port, over a real SQLite
file, with a meters file that declares the peers' meters."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.conftest import Clock, Tenants
from usagemeter.api.app import create_app
from usagemeter.meters import MeterRegistry
from usagemeter.store.sqlite import SQLiteStore

METERS = {
    "meters": [
        # OpenMeter's meters, as OpenMeter declares them: several read one event type.
        {
            "slug": "tokens_total",
            "eventType": "prompt",
            "aggregation": "SUM",
            "valueProperty": "$.tokens",
            "groupBy": {"model": "$.model"},
        },
        {
            "slug": "tokens_avg",
            "eventType": "prompt",
            "aggregation": "AVG",
            "valueProperty": "$.tokens",
            "groupBy": {"model": "$.model"},
        },
        {
            "slug": "tokens_max",
            "eventType": "prompt",
            "aggregation": "MAX",
            "valueProperty": "$.tokens",
        },
        {"slug": "prompts", "eventType": "prompt", "aggregation": "COUNT"},
        {
            "slug": "users",
            "eventType": "prompt",
            "aggregation": "UNIQUE_COUNT",
            "valueProperty": "$.user.id",
        },
        # Lago's billable metrics, by code and the property holding the value.
        {"code": "storage", "aggregation_type": "sum_agg", "field_name": "gb"},
        {"code": "api_calls", "aggregation_type": "count_agg"},
    ]
}


def write_meters(folder: Path) -> Path:
    path = folder / "meters.json"
    path.write_text(json.dumps(METERS))
    return path


@pytest.fixture
def meters_file(tmp_path: Path) -> Path:
    return write_meters(tmp_path)


@pytest.fixture
def server(store: SQLiteStore, clock: Clock, tenants: Tenants, meters_file: Path) -> Iterator[str]:
    """The whole app, serving on a free port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(store, MeterRegistry.from_file(meters_file), now=clock)
    instance = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def native_query(server: str, tenants: Tenants, metric: str, **params: str) -> Any:
    """What the native ``/v1/query`` says of root's tree: the totals over 2024-2025 unless
    the params say otherwise."""
    response = httpx.get(
        f"{server}/v1/query",
        params={
            "metric": metric,
            "account": "root",
            "start": "2024-01-01",
            "end": "2026-01-01",
            "granularity": "total",
            **params,
        },
        headers=tenants.headers("root"),
    )
    assert response.status_code == 200, response.text
    return response.json()
