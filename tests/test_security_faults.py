"""Faults: a full disk (issue 12, item 12) and unexpected errors (item 11)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import Tenants, event, sqlite_only
from tests.live import serve_in_thread
from usagemeter.api.app import create_app
from usagemeter.serving import ServeLimits
from usagemeter.store.sqlite import SQLiteStore


def batch(prefix: str, n: int) -> list[dict[str, object]]:
    # Distinct dimension sets and tags, so every event grows several tables and indexes.
    return [
        event(
            f"{prefix}-{i}",
            "root",
            "m",
            1735776000000 + i * 60_000,
            dimensions={"session_id": f"{prefix}-session-{i}" * 4},
            tags=[f"{prefix}-{i}"],
        )
        for i in range(n)
    ]


def total(client: TestClient, op: dict[str, str]) -> object:
    params = {"metric": "m", "account": "root", "start": "2025-01-01", "end": "2025-03-01"}
    return client.get("/v1/query", params={**params, "granularity": "total"}, headers=op).json()[
        "total"
    ]


@sqlite_only
def test_a_full_disk_answers_507_and_ingest_resumes_once_space_is_freed(
    client: TestClient, store: SQLiteStore, op: dict[str, str], tenants: Tenants
) -> None:
    """Ingest on a full disk answered a generic 500, and freed space did not let it resume."""
    assert client.post("/v1/events", json=batch("ok", 10), headers=op).status_code == 200
    pages = store._writer.execute("PRAGMA page_count").fetchone()[0]
    # SQLite answers SQLITE_FULL at max_page_count exactly as on a full disk.
    store._writer.execute(f"PRAGMA max_page_count = {pages}")
    full = client.post("/v1/events", json=batch("big", 500), headers=op)
    assert full.status_code == 507, full.text
    assert full.headers["retry-after"] == "30"
    error = full.json()["error"]
    assert error["code"] == "store_unavailable" and "disk is full" in error["message"]
    assert str(store.path) not in error["message"]
    wal = Path(f"{store.path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # the WAL gave its space back
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    # Nothing of the failed batch was kept; what was acknowledged is all there.
    assert total(client, op) == 10
    # Reads go on meanwhile.
    assert client.get("/v1/accounts/root", headers=op).status_code == 200

    store._writer.execute(f"PRAGMA max_page_count = {pages * 1000}")  # space freed
    again = client.post("/v1/events", json=batch("big", 500), headers=op)
    assert again.status_code == 200 and again.json()["accepted"] == 500
    assert client.get("/healthz").json() == {"status": "ok"}
    assert total(client, op) == 510


@sqlite_only
def test_a_clean_close_checkpoints_the_wal(db_path: Path, tenants: Tenants) -> None:
    store = tenants.store
    wal = Path(f"{db_path}-wal")
    assert wal.exists() and wal.stat().st_size > 0
    store.close()
    assert not wal.exists() or wal.stat().st_size == 0


@pytest.fixture
def live_server(store: SQLiteStore) -> Iterator[tuple[str, int]]:
    """The real app on a real uvicorn, with one route that fails unexpectedly."""
    app: FastAPI = create_app(store)

    @app.get("/test-boom")
    async def boom() -> None:
        raise RuntimeError("an unexpected bug")

    yield from serve_in_thread(app, ServeLimits())


def read_response(conn: socket.socket) -> bytes:
    data = b""

    def more() -> bytes:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    while b"\r\n\r\n" not in data:
        data += more()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length")))
    while len(body) < length:
        body += more()
    return head + b"\r\n\r\n" + body


def test_an_unexpected_error_is_our_json_and_the_connection_stays_open(
    live_server: tuple[str, int],
) -> None:
    """Each 500 closed the keep-alive connection."""
    with socket.create_connection(live_server, timeout=10) as conn:
        for path in ("/test-boom", "/test-boom", "/healthz"):
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            response = read_response(conn)
            if path == "/test-boom":
                assert response.startswith(b"HTTP/1.1 500"), response
                assert b'"code":"internal"' in response
                assert b"unexpected bug" not in response
                assert b"connection: close" not in response.lower()
            else:
                assert response.startswith(b"HTTP/1.1 200"), response
