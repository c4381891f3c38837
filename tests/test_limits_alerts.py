"""Threshold alerts end to end: a real HTTP receiver on 127.0.0.1 that refuses the first
attempts, signed deliveries retried until they land, late events, and restarts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Clock, Tenants, event
from usagemeter.api.app import create_app
from usagemeter.engine import Engine
from usagemeter.ingest import Ingestor
from usagemeter.limitmodel import Limit, Period, ThresholdUnit
from usagemeter.limits import periods_touched, record_crossings
from usagemeter.model import Account, Event
from usagemeter.store.base import Store
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.webhooks import RetryPolicy

FAST = RetryPolicy(first_s=0.02, max_s=0.1, window_s=60.0, timeout_s=5.0)


class Receiver:
    """A webhook endpoint: answers 500 to the first ``failures`` requests for each message
    id, then 204; keeps every request it got."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    seen = sum(
                        1
                        for h, _, _ in receiver.requests
                        if h["webhook-id"] == headers["webhook-id"]
                    )
                    status = 500 if seen < receiver.failures else 204
                    receiver.requests.append((headers, body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def delivered(self) -> list[tuple[dict[str, str], dict[str, Any]]]:
        with self.lock:
            return [(h, json.loads(b)) for h, b, status in self.requests if status == 204]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=2)
    yield r
    r.close()


def fast_app(store: Store, clock: Clock) -> FastAPI:
    app = create_app(store, now=clock)
    app.state.alerts.dispatcher.policy = FAST
    app.state.alerts.dispatcher.poll_s = 0.01
    return app


@pytest.fixture
def alerting(store: Store, clock: Clock) -> Iterator[TestClient]:
    with TestClient(fast_app(store, clock)) as c:
        yield c


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait (at most 10 s, as a guard against a hang, never as a measure) for ``condition``."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def settle(client: TestClient) -> None:
    """Every queued batch evaluated and every due delivery sent."""
    app: Any = client.app
    assert app.state.alerts.wait_idle()
    store = app.state.services.store
    wait_for(
        lambda: all(d.status.value != "pending" for d in store.list_deliveries()),
        "pending deliveries",
    )


def valid_signature(secret: str, headers: dict[str, str], body: bytes) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return headers["webhook-signature"] == f"v1,{expected}"


def setup(client: TestClient, op: dict[str, str], url: str, **limit: Any) -> str:
    hook = client.post("/v1/webhooks", json={"url": url}, headers=op)
    assert hook.status_code == 201, hook.text
    body = {"metric": "lookups", "amount": 10, "thresholds": [50, 80, 100], **limit}
    created = client.post("/v1/accounts/root/limits", json=body, headers=op)
    assert created.status_code == 201, created.text
    secret: str = hook.json()["secret"]
    return secret


def lookups(
    prefix: str, n: int, ts: str = "2025-03-10T10:00:00Z", account: str = "root"
) -> list[dict[str, Any]]:
    return [event(f"{prefix}{i}", account, "lookups", ts) for i in range(n)]


def test_every_crossing_is_delivered_once_signed_after_retries(
    alerting: TestClient, op: dict[str, str], tenants: Tenants, receiver: Receiver
) -> None:
    secret = setup(alerting, op, receiver.url)
    assert secret.startswith("whsec_")
    alerts = alerting.app.state.alerts  # type: ignore[attr-defined]

    def send(events: list[dict[str, Any]]) -> Any:
        # One batch evaluated at a time, so that each crossing's "used" is the usage of the
        # batch that crossed it (batches queued together are evaluated together).
        response = alerting.post("/v1/events", json=events, headers=op)
        assert alerts.wait_idle()
        return response

    assert send(lookups("a", 4)).status_code == 200  # 4 of 10: nothing yet
    assert send(lookups("b", 2, account="child")).status_code == 200  # 6: the 50% mark
    assert send(lookups("c", 5)).status_code == 200  # 11: 80% and 100% at once
    assert send(lookups("c", 5)).status_code == 200  # the same ids again: nothing new
    settle(alerting)

    delivered = receiver.delivered()
    thresholds = sorted(body["threshold"] for _, body in delivered)
    assert thresholds == [50, 80, 100]
    ids = [h["webhook-id"] for h, _ in delivered]
    assert len(set(ids)) == 3
    for headers, body in delivered:
        raw = json.dumps(body, separators=(",", ":")).encode()
        assert valid_signature(secret, headers, raw)
        assert body["type"] == "usage.threshold_crossed" and body["id"] == headers["webhook-id"]
        assert (body["account"], body["metric"], body["amount"]) == ("root", "lookups", 10)
        assert body["period_start"] == "2025-02-28T00:00:00Z"
        assert body["period_end"] == "2025-03-31T00:00:00Z"
        assert body["occurred_at"] == "2025-03-15T12:00:00Z"
    by_threshold = {body["threshold"]: body["used"] for _, body in delivered}
    assert by_threshold[50] == 6 and by_threshold[80] == by_threshold[100] == 11
    # Every message was refused twice, then taken: three attempts each, all recorded.
    assert len(receiver.requests) == 9
    deliveries = alerting.get("/v1/webhooks/deliveries", headers=op).json()["data"]
    assert [(d["status"], d["attempts"]) for d in deliveries] == [("delivered", 3)] * 3
    assert all(d["last_error"] is None for d in deliveries)  # cleared by the success


def test_a_forged_body_fails_the_signature(
    alerting: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    receiver = Receiver()
    try:
        secret = setup(alerting, op, receiver.url, thresholds=[100])
        alerting.post("/v1/events", json=lookups("a", 10), headers=op)
        settle(alerting)
        [(headers, body)] = receiver.delivered()
        raw = json.dumps(body, separators=(",", ":")).encode()
        assert valid_signature(secret, headers, raw)
        assert not valid_signature(secret, headers, raw.replace(b'"used":10', b'"used":1'))
        other = "whsec_" + base64.b64encode(b"x" * 24).decode()
        assert not valid_signature(other, headers, raw)
    finally:
        receiver.close()


def test_a_late_event_fires_in_its_own_period(
    alerting: TestClient, op: dict[str, str], tenants: Tenants, receiver: Receiver
) -> None:
    setup(alerting, op, receiver.url, period="day", thresholds=[100], amount=3)
    # Today (the clock's 2025-03-15) stays under; a backfill of March 2nd crosses there.
    alerting.post("/v1/events", json=lookups("today", 2, "2025-03-15T09:00:00Z"), headers=op)
    alerting.post("/v1/events", json=lookups("late", 3, "2025-03-02T23:00:00Z"), headers=op)
    settle(alerting)
    [(_, body)] = receiver.delivered()
    assert (body["period_start"], body["used"]) == ("2025-03-02T00:00:00Z", 3)


def test_no_alert_twice_across_a_restart(
    store: Store, clock: Clock, op: dict[str, str], tenants: Tenants, receiver: Receiver
) -> None:
    receiver.failures = 0
    with TestClient(fast_app(store, clock)) as first:
        setup(first, op, receiver.url, thresholds=[50])
        first.post("/v1/events", json=lookups("a", 6), headers=op)
        settle(first)
    assert len(receiver.delivered()) == 1
    with TestClient(fast_app(store, clock)) as second:
        second.post("/v1/events", json=lookups("b", 1), headers=op)  # still over 50%
        settle(second)
        assert second.app.state.alerts.reconcile() == 0  # type: ignore[attr-defined]
    assert len(receiver.requests) == 1


def test_a_crossing_missed_by_a_crash_fires_at_the_next_start(
    store: Store, clock: Clock, op: dict[str, str], tenants: Tenants, receiver: Receiver
) -> None:
    """Events committed by a process that died before it evaluated them: the next start
    finds the crossing, and delivers it."""
    receiver.failures = 1
    with TestClient(fast_app(store, clock)) as first:
        setup(first, op, receiver.url, thresholds=[100])
    # The crash: the batch is on disk, its evaluation never ran.
    Ingestor(store).ingest(lookups("a", 10))
    with TestClient(fast_app(store, clock)) as second:
        settle(second)
    [(_, body)] = receiver.delivered()
    assert body["used"] == 10 and body["threshold"] == 100


def test_a_crash_loses_no_alert_of_an_old_period(
    store: Store, clock: Clock, op: dict[str, str], tenants: Tenants, receiver: Receiver
) -> None:
    """A backfill into a day long past, committed by a process that died before it
    evaluated it: the current and previous periods say nothing of it, the event log does."""
    receiver.failures = 0
    with TestClient(fast_app(store, clock)) as first:
        setup(first, op, receiver.url, period="day", thresholds=[100], amount=3)
        first.post("/v1/events", json=lookups("now", 1, "2025-03-15T09:00:00Z"), headers=op)
        settle(first)
    Ingestor(store).ingest(lookups("old", 3, "2025-03-02T12:00:00Z"))  # the crash
    with TestClient(fast_app(store, clock)) as second:
        settle(second)
    [(_, body)] = receiver.delivered()
    assert (body["period_start"], body["used"]) == ("2025-03-02T00:00:00Z", 3)


def test_the_event_log_says_what_was_touched(store: Store, tenants: Tenants) -> None:
    before = store.last_seq()
    ingest = Ingestor(store)
    ingest.ingest(lookups("a", 2, "2025-03-02T12:00:00Z") + lookups("b", 1, "2025-03-09T00:14:59Z"))
    middle = store.last_seq()
    ingest.ingest([event("c", "root", "requests", "2025-03-10T10:00:00Z")])
    assert before < middle < store.last_seq()
    touched = sorted(store.touched(before, middle, ["lookups", "requests"]))
    march_2, march_9 = 1740916800000, 1741479299000
    assert touched == [("root", "lookups", march_2, march_2), ("root", "lookups", march_9, march_9)]
    assert store.touched(middle, store.last_seq(), ["lookups"]) == []
    assert [t[:2] for t in store.touched(middle, store.last_seq(), ["requests"])] == [
        ("root", "requests")
    ]


def test_pending_deliveries_survive_a_restart(
    store: Store, clock: Clock, op: dict[str, str], tenants: Tenants, tmp_path: Path
) -> None:
    """A delivery not yet taken when the process stops is sent by the next one."""
    down = Receiver(failures=1000)
    with TestClient(fast_app(store, clock)) as first:
        setup(first, op, down.url, thresholds=[100])
        first.post("/v1/events", json=lookups("a", 10), headers=op)
        first.app.state.alerts.wait_idle()  # type: ignore[attr-defined]
        wait_for(lambda: len(down.requests) >= 2, "two refused attempts")
    down.close()
    deliveries = store.list_deliveries()
    assert [d.status.value for d in deliveries] == ["pending"]
    up = Receiver()
    try:
        # The endpoint moved: point the stored one at the new receiver.
        [endpoint] = store.list_webhooks()
        store.delete_webhook(endpoint.id)
        store.create_webhook(replace(endpoint, url=up.url))
        replayed = store.replay_delivery(deliveries[0].id, 0)
        assert replayed.status.value == "pending"
        with TestClient(fast_app(store, clock)) as second:
            settle(second)
        [(headers, _)] = up.delivered()
        assert headers["webhook-id"] == deliveries[0].crossing_id
    finally:
        up.close()


def test_failed_deliveries_can_be_replayed(
    alerting: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    receiver = Receiver(failures=1000)
    alerting.app.state.alerts.dispatcher.policy = RetryPolicy(  # type: ignore[attr-defined]
        first_s=0.01, max_s=0.01, window_s=0.05
    )
    try:
        setup(alerting, op, receiver.url, thresholds=[100])
        alerting.post("/v1/events", json=lookups("a", 10), headers=op)
        settle(alerting)
        [failed] = alerting.get("/v1/webhooks/deliveries", headers=op).json()["data"]
        assert failed["status"] == "failed" and failed["attempts"] >= 1
        receiver.failures = 0
        replay = alerting.post(f"/v1/webhooks/deliveries/{failed['id']}/replay", headers=op)
        assert replay.status_code == 200 and replay.json()["status"] == "pending"
        settle(alerting)
        [done] = alerting.get("/v1/webhooks/deliveries", headers=op).json()["data"]
        assert done["status"] == "delivered"
        assert len(receiver.delivered()) == 1
        missing = alerting.post("/v1/webhooks/deliveries/dlv_nope/replay", headers=op)
        assert missing.status_code == 404
    finally:
        receiver.close()


def test_webhook_endpoints(client: TestClient, op: dict[str, str], tenants: Tenants) -> None:
    created = client.post(
        "/v1/webhooks", json={"url": "https://example.com/h", "account": "root"}, headers=op
    )
    assert created.status_code == 201
    hook = created.json()
    assert hook["account"] == "root" and hook["secret"].startswith("whsec_")
    listed = client.get("/v1/webhooks", headers=op).json()["data"]
    assert listed == [{k: v for k, v in hook.items() if k != "secret"}]  # shown once
    for bad in ({"url": "ftp://x"}, {"url": "not a url"}, {"url": "https://x", "account": "ghost"}):
        response = client.post("/v1/webhooks", json=bad, headers=op)
        assert response.status_code == 400, bad
    root = tenants.headers("root")
    assert client.post("/v1/webhooks", json={"url": "https://x"}, headers=root).status_code == 403
    assert client.get("/v1/webhooks", headers=root).status_code == 403
    assert client.get("/v1/webhooks/deliveries", headers=root).status_code == 403
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=op).status_code == 200
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=op).status_code == 404
    assert client.get("/v1/webhooks", headers=op).json()["data"] == []


def test_an_accounts_endpoint_hears_only_its_account(
    alerting: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    mine, theirs = Receiver(), Receiver()
    try:
        alerting.post("/v1/webhooks", json={"url": mine.url, "account": "root"}, headers=op)
        alerting.post("/v1/webhooks", json={"url": theirs.url, "account": "other"}, headers=op)
        for account in ("root", "other"):
            alerting.post(
                f"/v1/accounts/{account}/limits",
                json={"metric": "lookups", "amount": 1, "include_subaccounts": False},
                headers=op,
            )
        alerting.post("/v1/events", json=lookups("a", 1, account="root"), headers=op)
        alerting.post("/v1/events", json=lookups("c", 5, account="child"), headers=op)
        settle(alerting)
        assert [b["account"] for _, b in mine.delivered()] == ["root"]
        assert theirs.requests == []
    finally:
        mine.close()
        theirs.close()


def test_a_raised_limit_fires_again_at_its_new_amount(
    alerting: TestClient, op: dict[str, str], tenants: Tenants, receiver: Receiver
) -> None:
    receiver.failures = 0
    setup(alerting, op, receiver.url, thresholds=[100])
    alerting.post("/v1/events", json=lookups("a", 10), headers=op)
    settle(alerting)
    patched = alerting.patch("/v1/accounts/root/limits/lookups", json={"amount": 20}, headers=op)
    assert patched.status_code == 200
    alerting.post("/v1/events", json=lookups("b", 5), headers=op)  # 15 of 20: quiet
    alerting.post("/v1/events", json=lookups("c", 5), headers=op)  # 20 of 20
    settle(alerting)
    assert [(b["amount"], b["used"]) for _, b in receiver.delivered()] == [(10, 10), (20, 20)]


@settings(max_examples=40, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=6),
        min_size=1,
        max_size=6,
    ),
    thresholds=st.lists(
        st.integers(min_value=1, max_value=150), min_size=1, max_size=5, unique=True
    ),
)
def test_each_threshold_reached_is_recorded_once(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[int]], thresholds: list[int]
) -> None:
    """Whatever the batches (days of March, in any order, late ones too) and however often
    the limits are evaluated: a threshold is recorded once per period exactly when the
    period's final usage reaches it, with the usage seen then at or above it."""
    store = SQLiteStore(tmp_path_factory.mktemp("prop") / "u.db")
    try:
        store.create_account(Account("a", "A"))
        limit = Limit(
            "lim",
            "a",
            "m",
            100.0,
            Period.DAY,
            thresholds=tuple(map(float, thresholds)),
            threshold_unit=ThresholdUnit.ABSOLUTE,
        )
        store.create_limit(limit)
        engine, now = Engine(store), datetime(2025, 3, 31, tzinfo=UTC)
        per_day: dict[int, int] = {}
        n = 0
        for batch in batches:
            events = []
            for offset in batch:  # offset: hours into March, so days 1 and 2
                ts = int(datetime(2025, 3, 1, tzinfo=UTC).timestamp() * 1000) + offset * 3_600_000
                events.append(Event(f"e{n}", "a", "m", ts, value=7.0))
                per_day[offset // 24] = per_day.get(offset // 24, 0) + 7
                n += 1
            store.append(events)
            account = store.get_account("a")
            for _ in range(2):  # evaluated twice: a retry, a reconcile
                for at in periods_touched(limit, account, [e.ts_ms for e in events]):
                    record_crossings(engine, store, limit, at, now)
        recorded = [json.loads(d.payload) for d in store.list_deliveries()]
        assert recorded == []  # no endpoint: crossings are recorded without deliveries
        rows = store._limit_read("SELECT period_start, threshold, payload FROM crossings")
        found = sorted((int(r[0]) // 86_400_000, float(r[1])) for r in rows)
        march_1 = int(datetime(2025, 3, 1, tzinfo=UTC).timestamp() * 1000) // 86_400_000
        expected = sorted(
            (march_1 + day, float(t))
            for day, used in per_day.items()
            for t in thresholds
            if used >= t
        )
        assert found == expected
        for _, threshold, payload in rows:
            assert json.loads(payload)["used"] >= threshold
    finally:
        store.close()
