"""The Python client and the middleware, against a real server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
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
from usagemeter.client import AsyncUsageClient, UsageClient, UsageError
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


def test_client_sets_bad_events_aside_and_sends_the_rest(
    server: str, op: dict[str, str], tenants: Tenants
) -> None:
    """Issue 11.1: 99 good events and one for an unknown account; the 99 are stored."""
    at = datetime(2025, 3, 1, tzinfo=UTC)
    refused: list[tuple[dict[str, Any], str]] = []
    secret = op["Authorization"].removeprefix("Bearer ")
    usage = UsageClient(
        server,
        secret,
        batch_size=100,
        background=False,
        dead_letter=lambda e, r: refused.append((e, r)),
    )
    for i in range(100):
        usage.record("lookups", account="ghost" if i == 41 else "root", ts=at, id=f"e{i}")
    usage.flush()
    assert usage.accepted == 99 and usage.dead_letters == 1
    assert [(e["id"], e["account"]) for e, _ in refused] == [("e41", "ghost")]
    assert "does not exist" in refused[0][1]
    assert _total(server, op, "lookups")["total"] == 99
    # Sent again (the caller retries), the same ids are duplicates: nothing counted twice.
    for i in range(100):
        if i != 41:
            usage.record("lookups", account="root", ts=at, id=f"e{i}")
    usage.close()
    assert usage.duplicates == 99
    assert _total(server, op, "lookups")["total"] == 99


def test_client_dead_letter_file_keeps_each_event_with_its_reason(
    server: str, tenants: Tenants, tmp_path: Path
) -> None:
    letters = tmp_path / "dead.ndjson"
    with UsageClient(
        server, tenants.secrets["root"], background=False, dead_letter=letters
    ) as usage:
        usage.record("lookups", account="other", ts=datetime(2025, 3, 1, tzinfo=UTC), id="x1")
        usage.record("lookups", ts=datetime(2025, 3, 1, tzinfo=UTC), id="x2")
        usage.record("no spaces allowed", ts=datetime(2025, 3, 1, tzinfo=UTC), id="x3")
    lines = [json.loads(line) for line in letters.read_text().splitlines()]
    assert [line["event"]["id"] for line in lines] == ["x1", "x3"]
    assert "may not send events" in lines[0]["reason"]
    assert usage.accepted == 1


def test_client_refused_as_a_whole_says_so_and_keeps_the_events(server: str) -> None:
    refused: list[dict[str, Any]] = []
    usage = UsageClient(
        server, "not-a-key", background=False, dead_letter=lambda e, r: refused.append(e)
    )
    usage.record("lookups", account="root")
    with pytest.raises(UsageError, match="401"):
        usage.flush()
    assert len(refused) == 1 and usage._pending == []
    usage.close()


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


def _by_account(base: str, op: dict[str, str]) -> dict[str, int]:
    result = _total(
        base, op, "requests", group_by="subaccount", start="2000-01-01", end="2100-01-01"
    )
    return {t["group"]["subaccount"]: t["value"] for t in result["totals"]}


def test_asgi_middleware_keeps_every_good_event_of_mixed_batches(
    server: str, tenants: Tenants, op: dict[str, str]
) -> None:
    """Issue 11.1 and 11.6: the account comes from a header of a Starlette Request; requests
    of an unknown account go to the dead letters and cost nobody else's usage."""

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    refused: list[tuple[dict[str, Any], str]] = []
    usage = UsageClient(
        server,
        op["Authorization"].removeprefix("Bearer "),
        batch_size=7,
        background=False,
        dead_letter=lambda e, r: refused.append((e, r)),
    )
    app = UsageMiddleware(
        Starlette(routes=[Route("/hello", hello)]),
        client=usage,
        account=lambda request: request.headers.get("x-customer"),
    )
    plan = ["root"] * 30 + ["ghost"] * 10 + ["child"] * 20 + ["nobody"] * 3 + [None] * 5
    with TestClient(app) as http:  # type: ignore[arg-type]
        for i, customer in enumerate(plan):
            headers = {"x-customer": customer} if customer else {}
            assert http.get("/hello", headers=headers).status_code == 200
            if i % 9 == 0:
                usage.flush()  # batches that mix good and bad events, at varying offsets
    usage.close()
    assert _by_account(server, op) == {"root": 30, "child": 20}
    assert sorted(e["account"] for e, _ in refused) == ["ghost"] * 10 + ["nobody"] * 3
    assert all("does not exist" in reason for _, reason in refused)
    assert usage.accepted == 50 and usage.dead_letters == 13


def test_wsgi_middleware_account_gets_the_environ(
    server: str, tenants: Tenants, op: dict[str, str]
) -> None:
    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    refused: list[dict[str, Any]] = []
    usage = UsageClient(
        server,
        op["Authorization"].removeprefix("Bearer "),
        batch_size=4,
        background=False,
        dead_letter=lambda e, r: refused.append(e),
    )
    app = WSGIUsageMiddleware(
        wsgi_app, client=usage, account=lambda environ: environ.get("HTTP_X_CUSTOMER")
    )
    for customer in ["sibling", "ghost"] * 6:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "HTTP_X_CUSTOMER": customer}
        assert list(app(environ, lambda *args: None)) == [b"ok"]
    usage.close()
    assert _by_account(server, op) == {"sibling": 6}
    assert len(refused) == 6


def test_middleware_refuses_an_account_it_cannot_call(tenants: Tenants) -> None:
    usage = UsageClient("http://127.0.0.1:9", "k", background=False)
    for bad in ("root", lambda: "root", lambda a, b: "root"):
        with pytest.raises(TypeError, match="account must"):
            UsageMiddleware(Starlette(), client=usage, account=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="account must"):
            WSGIUsageMiddleware(lambda e, s: [], client=usage, account=bad)  # type: ignore[arg-type]
    usage.close()


def test_middleware_survives_an_account_callable_that_raises(
    server: str, tenants: Tenants, op: dict[str, str]
) -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    def broken(request: Request) -> str:
        raise KeyError("no such header")

    usage = UsageClient(server, tenants.secrets["root"], background=False)
    app = UsageMiddleware(Starlette(routes=[Route("/hello", hello)]), client=usage, account=broken)
    with TestClient(app) as http:  # type: ignore[arg-type]
        assert http.get("/hello").status_code == 200
    usage.close()
    assert usage.accepted == 0


def test_async_client_keeps_every_good_event_of_mixed_batches(
    server: str, op: dict[str, str], tenants: Tenants
) -> None:
    """Issue 11.1, the asyncio client: batches sent by its task and by flush() alike."""
    refused: list[dict[str, Any]] = []
    at = datetime(2025, 3, 1, tzinfo=UTC)

    async def main() -> AsyncUsageClient:
        async with AsyncUsageClient(
            server,
            op["Authorization"].removeprefix("Bearer "),
            batch_size=6,
            flush_interval=60,
            dead_letter=lambda e, r: refused.append(e),
        ) as usage:
            for i in range(40):
                account = "ghost" if i % 7 == 3 else ("child" if i % 2 else "root")
                usage.record("lookups", account=account, ts=at, id=f"a{i}")
                if i % 10 == 9:
                    await asyncio.sleep(0)  # the task sends full batches meanwhile
            await usage.flush()
            usage.record("lookups", account="root", ts=at, id="a0")  # a retry: counted once
        return usage

    usage = asyncio.run(main())
    ghosts = [i for i in range(40) if i % 7 == 3]
    assert sorted(e["id"] for e in refused) == sorted(f"a{i}" for i in ghosts)
    assert usage.accepted == 40 - len(ghosts) and usage.duplicates == 1
    result = _total(server, op, "lookups", group_by="subaccount")
    children = len([i for i in range(40) if i % 2 and i not in ghosts])
    assert {t["group"]["subaccount"]: t["value"] for t in result["totals"]} == {
        "root": 40 - len(ghosts) - children,
        "child": children,
    }
