"""GET /metrics (issue 18, item 1): counters equal what was sent, through a real server."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Tenants, event
from tests.live import serve_in_thread
from usagemeter.api.app import create_app
from usagemeter.ingest import Ingestor
from usagemeter.metrics import Telemetry, serve_apart, watch_ingest
from usagemeter.model import Account
from usagemeter.serving import ServeLimits
from usagemeter.store.base import Store
from usagemeter.store.sqlite import SQLiteStore


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def batch(prefix: str, n: int, account: str = "root") -> list[dict[str, Any]]:
    return [event(f"{prefix}-{i}", account, "lookups", 1736935200000 + i) for i in range(n)]


@pytest.fixture
def live(store: Store, tenants: Tenants) -> Iterator[str]:
    app = create_app(store)
    for host, port in serve_in_thread(app, ServeLimits()):
        yield f"http://{host}:{port}"


def test_scrape_during_ingest_counts_what_was_sent(
    live: str, tenants: Tenants, op: dict[str, str]
) -> None:
    writers, batches, size = 3, 8, 25
    scrapes: list[str] = []
    done = threading.Event()

    def write(w: int) -> None:
        with httpx.Client(base_url=live, headers=op, timeout=30) as c:
            for b in range(batches):
                r = c.post("/v1/events", json=batch(f"w{w}b{b}", size))
                assert r.status_code == 200, r.text

    def scrape() -> None:
        with httpx.Client(base_url=live, headers=op, timeout=30) as c:
            while not done.is_set():
                r = c.get("/metrics")
                assert r.status_code == 200
                scrapes.append(r.text)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with httpx.Client(base_url=live, headers=op, timeout=30) as c:
        # A retried batch: all duplicates. A bad one: two events at fault, nothing stored.
        assert c.post("/v1/events", json=batch("w0b0", size)).json()["duplicates"] == size
        bad = [*batch("bad", 3)]
        bad[0]["ts"] = "yesterday"
        bad[2]["metric"] = ""
        assert c.post("/v1/events", json=bad).status_code == 400
        assert c.post("/v1/events", content=b"[{").status_code == 400
        done.set()
        scraper.join()
        text = c.get("/metrics").text

    sent = writers * batches * size
    assert scrapes, "the scraper ran during ingest"
    # A scrape taken mid-ingest never counts more than was stored.
    assert all(value(s, "usagemeter_events_accepted_total") <= sent for s in scrapes)
    assert value(text, "usagemeter_events_accepted_total") == sent
    assert value(text, "usagemeter_events_duplicate_total") == size
    assert value(text, "usagemeter_events_rejected_total", reason="ts") == 1
    assert value(text, "usagemeter_events_rejected_total", reason="metric") == 1
    assert value(text, "usagemeter_events_rejected_total", reason="invalid_json") == 1
    stored_batches = writers * batches + 1
    assert value(text, "usagemeter_ingest_batch_size_count") == stored_batches
    assert value(text, "usagemeter_ingest_batch_size_sum") == sent + size
    assert value(text, "usagemeter_store_commit_duration_seconds_count") == stored_batches
    requests = dict(method="POST", route="/v1/events")
    assert value(text, "usagemeter_http_requests_total", status="200", **requests) == (
        stored_batches
    )
    assert value(text, "usagemeter_http_requests_total", status="400", **requests) == 2
    assert value(text, "usagemeter_http_request_duration_seconds_count", **requests) == (
        stored_batches + 2
    )
    assert value(text, "usagemeter_store_size_bytes") > 0


def test_routes_are_labelled_by_template_never_the_secret_in_the_path(
    client: TestClient, tenants: Tenants, op: dict[str, str]
) -> None:
    secret = tenants.secrets["root"]
    client.get(f"/keys/{secret}/usage", params={"user_token": secret})
    client.get(f"/no/such/{secret}")
    text = client.get("/metrics", headers=op).text
    assert secret not in text
    assert (
        value(
            text,
            "usagemeter_http_requests_total",
            method="GET",
            route="/keys/{key}/usage",
            status="200",
        )
        == 1
    )
    assert (
        value(text, "usagemeter_http_requests_total", method="GET", route="unmatched", status="404")
        == 1
    )


def test_account_ids_only_when_asked(store: Store, tenants: Tenants, op: dict[str, str]) -> None:
    for asked in (False, True):
        with TestClient(create_app(store, metrics_accounts=asked)) as c:
            c.post(
                "/v1/events",
                json=batch(f"a{asked}", 2, "root") + batch(f"b{asked}", 3, "other"),
                headers=op,
            )
            text = c.get("/metrics", headers=op).text
        assert ('account="other"' in text) is asked
        if asked:
            assert value(text, "usagemeter_events_received_total", account="root") == 2
            assert value(text, "usagemeter_events_received_total", account="other") == 3


def test_who_may_scrape(client: TestClient, tenants: Tenants, op: dict[str, str]) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=tenants.headers("root")).status_code == 403
    response = client.get("/metrics", headers=op)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")


def test_off_switch(store: Store, tenants: Tenants, op: dict[str, str]) -> None:
    with TestClient(create_app(store, metrics=False)) as c:
        response = c.get("/metrics", headers=op)
        assert response.status_code == 404
        assert "--no-metrics" in response.json()["error"]["message"]


def test_separate_port_needs_no_key(store: Store, tenants: Tenants) -> None:
    telemetry = Telemetry(store)
    telemetry.accepted.inc(7)
    server = serve_apart(telemetry, "127.0.0.1", 0)
    try:
        text = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics").text
    finally:
        server.shutdown()
        server.server_close()
    assert value(text, "usagemeter_events_accepted_total") == 7


@settings(max_examples=15, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.integers(0, 15), min_size=1, max_size=8, unique=True), min_size=1, max_size=6
    )
)
def test_counters_add_up_for_any_batches_with_retries(batches: list[list[int]]) -> None:
    """Whatever is sent again: accepted counts each id once, duplicates the rest, and the
    batch sizes sum to everything sent."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "usage.db")
        store.create_account(Account("acme", "Acme"))
        telemetry = Telemetry(store)
        ingestor = watch_ingest(Ingestor(store), telemetry)
        for ids in batches:
            ingestor.ingest([event(f"e{i}", "acme", "m", 1736935200000 + i) for i in ids])
        text = telemetry.render().decode()
        store.close()
    sent = sum(len(ids) for ids in batches)
    distinct = len({i for ids in batches for i in ids})
    assert value(text, "usagemeter_events_accepted_total") == distinct
    assert value(text, "usagemeter_events_duplicate_total") == sent - distinct
    assert value(text, "usagemeter_ingest_batch_size_sum") == sent
    assert value(text, "usagemeter_ingest_batch_size_count") == len(batches)
