"""The Python client and the middleware, against a real server on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.conftest import Clock, Tenants
from usagemeter.api.app import create_app
from usagemeter.client import UsageClient, UsageError
from usagemeter.middleware import UsageMiddleware, WSGIUsageMiddleware
from usagemeter.store.sqlite import SQLiteStore


@pytest.fixture
def server(store: SQLiteStore, clock: Clock) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(store, now=clock), port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def _total(base: str, headers: dict[str, str], metric: str, **params: str) -> Any:
    response = httpx.get(
        f"{base}/v1/query",
        params={
            "metric": metric,
            "account": "root",
            "start": "2025-01-01",
            "end": "2026-01-01",
            "granularity": "total",
            **params,
        },
        headers=headers,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_client_batches_and_counts_once(server: str, tenants: Tenants, op: dict[str, str]) -> None:
    at = datetime(2025, 3, 1, tzinfo=UTC)
    secret = tenants.secrets["root"]  # read + ingest for its own account
    with UsageClient(server, secret, batch_size=7, flush_interval=60) as usage:
        ids = [
            usage.record("lookups", ts=at, tags=["a"], dimensions={"licensee": "l"})
            for _ in range(20)
        ]
        usage.flush()
        assert usage.accepted == 20
        # Recording an id again (a retry from the caller's side) is counted once.
        usage.record("lookups", ts=at, id=ids[0])
    assert usage.duplicates == 1
    assert _total(server, op, "lookups")["total"] == 20
    assert _total(server, op, "lookups", tags="a", filter="licensee=l")["total"] == 20


def test_client_refuses_a_bad_batch_loudly(server: str, tenants: Tenants) -> None:
    with UsageClient(server, tenants.secrets["root"], background=False) as usage:
        usage.record("lookups", account="other", ts=datetime(2025, 3, 1, tzinfo=UTC))
        with pytest.raises(UsageError, match="may not send events"):
            usage.flush()


def test_client_keeps_events_when_the_server_is_down(tenants: Tenants) -> None:
    usage = UsageClient("http://127.0.0.1:9", tenants.secrets["root"], retries=1, background=False)
    usage.record("lookups")
    with pytest.raises(UsageError, match="not acknowledged"):
        usage.flush()
    assert len(usage._pending) == 1  # kept for the next flush, not dropped
    with pytest.raises(UsageError):
        usage.close()  # closing says so too, rather than lose them quietly


def test_asgi_middleware_meters_each_request(
    server: str, tenants: Tenants, op: dict[str, str]
) -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi", status_code=201 if request.query_params.get("new") else 200)

    async def boom(request: Request) -> PlainTextResponse:
        raise RuntimeError("down")

    metered = Starlette(routes=[Route("/hello", hello), Route("/boom", boom)])
    usage = UsageClient(server, tenants.secrets["root"], background=False)
    app = UsageMiddleware(metered, client=usage, account=lambda scope: "root")
    with TestClient(app, raise_server_exceptions=False) as http:  # type: ignore[arg-type]
        assert http.get("/hello").status_code == 200
        assert http.get("/hello?new=1").status_code == 201
        assert http.get("/boom").status_code == 500
    usage.close()
    result = _total(server, op, "requests", group_by="status", start="2000-01-01", end="2100-01-01")
    assert {t["group"]["status"]: t["value"] for t in result["totals"]} == {
        "200": 1,
        "201": 1,
        "500": 1,
    }


def test_wsgi_middleware_meters_each_request(
    server: str, tenants: Tenants, op: dict[str, str]
) -> None:
    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"nope"]

    usage = UsageClient(server, tenants.secrets["root"], background=False)
    app = WSGIUsageMiddleware(wsgi_app, client=usage, account=lambda environ: "root")
    body = app({"REQUEST_METHOD": "GET", "PATH_INFO": "/x"}, lambda *args: None)
    assert list(body) == [b"nope"]
    usage.close()
    result = _total(
        server, op, "requests", group_by="status,route", start="2000-01-01", end="2100-01-01"
    )
    assert [(t["group"], t["value"]) for t in result["totals"]] == [
        ({"status": "404", "route": "/x"}, 1)
    ]
