"""Limits over HTTP: the operator's API, the check, and its periods (on every store)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from typer.testing import CliRunner

from tests.conftest import Clock, Tenants, event
from usagemeter.cli import app as cli_app
from usagemeter.client import UsageClient, UsageError
from usagemeter.gate import LimitGate
from usagemeter.limitmodel import Crossing, Delivery, DeliveryStatus, Limit, Period
from usagemeter.limits import period_at
from usagemeter.middleware import UsageMiddleware, WSGIUsageMiddleware
from usagemeter.model import Account
from usagemeter.store.base import Conflict, NotFound, Store
from usagemeter.timewindows import BillingCycle, parse_zone


def make_limit(client: TestClient, op: dict[str, str], account: str, **body: Any) -> Any:
    response = client.post(f"/v1/accounts/{account}/limits", json=body, headers=op)
    assert response.status_code == 201, response.text
    return response.json()


def test_limit_lifecycle(client: TestClient, op: dict[str, str], tenants: Tenants) -> None:
    created = make_limit(client, op, "root", metric="lookups", amount=100, thresholds=[80, 50])
    assert created["id"].startswith("lim_")
    assert created["period"] == "billing_cycle" and created["tz"] == "UTC"
    assert created["thresholds"] == [50, 80]  # sorted, as they are crossed

    again = client.post(
        "/v1/accounts/root/limits", json={"metric": "lookups", "amount": 5}, headers=op
    )
    assert again.status_code == 409 and "PATCH" in again.json()["error"]["message"]

    patched = client.patch(
        "/v1/accounts/root/limits/lookups", json={"amount": 200, "action": "block"}, headers=op
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["amount"] == 200 and patched.json()["action"] == "block"
    assert patched.json()["thresholds"] == [50, 80] and patched.json()["id"] == created["id"]

    listed = client.get("/v1/accounts/root/limits", headers=tenants.headers("root")).json()
    assert [limit["metric"] for limit in listed["data"]] == ["lookups"]
    assert listed["data"][0]["check"]["amount"] == 200

    deleted = client.delete("/v1/accounts/root/limits/lookups", headers=op)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    gone = client.get("/v1/accounts/root/limits/lookups", headers=op)
    assert gone.status_code == 404 and "no limit" in gone.json()["error"]["message"]
    assert client.delete("/v1/accounts/root/limits/lookups", headers=op).status_code == 404


def test_bad_limits_are_refused_with_every_reason(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    response = client.post(
        "/v1/accounts/root/limits",
        json={
            "metric": "",
            "amount": -1,
            "period": "week",
            "tz": "Mars/Olympus",
            "thresholds": [],
            "action": "shout",
        },
        headers=op,
    )
    assert response.status_code == 400
    errors = response.json()["error"]["details"]["errors"]
    for field in ("metric", "amount", "period", "tz", "thresholds", "action"):
        assert any(e.startswith(field) for e in errors), (field, errors)
    inf = client.post(
        "/v1/accounts/root/limits",
        content=b'{"metric": "x", "amount": 1e999}',
        headers={**op, "content-type": "application/json"},
    )
    assert inf.status_code == 400
    unknown = client.post(
        "/v1/accounts/root/limits", json={"metric": "x", "amount": 1, "colour": 1}, headers=op
    )
    assert unknown.status_code == 400 and "colour" in unknown.json()["error"]["message"]
    bad_patch = client.patch("/v1/accounts/root/limits/x", json={"amount": 1}, headers=op)
    assert bad_patch.status_code == 404
    make_limit(client, op, "root", metric="x", amount=1)
    bad_patch = client.patch("/v1/accounts/root/limits/x", json={"thresholds": [0]}, headers=op)
    assert bad_patch.status_code == 400 and "thresholds[0]" in bad_patch.text


def test_only_operators_manage_limits(
    client: TestClient, tenants: Tenants, op: dict[str, str]
) -> None:
    root = tenants.headers("root")
    body = {"metric": "lookups", "amount": 10}
    assert client.post("/v1/accounts/root/limits", json=body, headers=root).status_code == 403
    missing = client.post("/v1/accounts/ghost/limits", json=body, headers=op)
    assert missing.status_code == 404
    make_limit(client, op, "root", **body)
    assert (
        client.patch("/v1/accounts/root/limits/lookups", json={}, headers=root).status_code == 403
    )
    assert client.delete("/v1/accounts/root/limits/lookups", headers=root).status_code == 403


def test_check_reads_its_own_writes(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any
) -> None:
    make_limit(client, op, "root", metric="lookups", amount=3)
    root = tenants.headers("root")
    first = client.get("/v1/accounts/root/limits/lookups", headers=root).json()
    # The root's billing cycle is anchored on 2024-01-31: on 2025-03-15 it began 02-28.
    assert first == {
        "account": "root",
        "metric": "lookups",
        "used": 0,
        "amount": 3,
        "remaining": 3,
        "period": "billing_cycle",
        "period_start": "2025-02-28T00:00:00Z",
        "period_end": "2025-03-31T00:00:00Z",
        "exceeded": False,
        "action": "alert",
    }
    send(
        event("e1", "root", "lookups", "2025-03-01T00:00:00Z"),
        event("e2", "child", "lookups", "2025-03-15T11:00:00Z"),  # a subaccount's counts
        event("e3", "root", "lookups", "2025-02-27T23:59:59Z"),  # the cycle before
        event("e4", "root", "other", "2025-03-15T11:00:00Z"),
    )
    after = client.get("/v1/accounts/root/limits/lookups", headers=root).json()
    assert (after["used"], after["remaining"], after["exceeded"]) == (2, 1, False)
    send(event("e5", "root", "lookups", "2025-03-30T23:59:59Z"))
    full = client.get("/v1/accounts/root/limits/lookups", headers=root).json()
    assert (full["used"], full["remaining"], full["exceeded"]) == (3, 0, True)


def test_check_counts_what_a_report_counts(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any
) -> None:
    """A limit means what /v1/query says for the same metric, range and zone."""
    make_limit(client, op, "root", metric="tokens", amount=1000, period="day", tz="Asia/Kolkata")
    send(
        event("t1", "root", "tokens", "2025-03-14T18:29:00Z", value=7),  # Kolkata's 14th
        event("t2", "root", "tokens", "2025-03-14T18:30:00Z", value=11),  # Kolkata's 15th
        event("t3", "grandchild", "tokens", "2025-03-15T12:00:00Z", value=13),
    )
    checked = client.get("/v1/accounts/root/limits/tokens", headers=op).json()
    assert checked["period_start"] == "2025-03-15T00:00:00+05:30"
    report = client.get(
        "/v1/query",
        params={
            "metric": "tokens",
            "account": "root",
            "start": checked["period_start"],
            "end": checked["period_end"],
            "granularity": "total",
            "tz": "Asia/Kolkata",
        },
        headers=op,
    ).json()
    assert checked["used"] == report["total"] == 24


def test_check_keeps_tenants_apart(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    make_limit(client, op, "root", metric="lookups", amount=3)
    make_limit(client, op, "other", metric="lookups", amount=3)
    own = client.get("/v1/accounts/other/limits/lookups", headers=tenants.headers("other"))
    assert own.status_code == 200
    foreign = client.get("/v1/accounts/root/limits/lookups", headers=tenants.headers("other"))
    missing = client.get("/v1/accounts/ghost/limits/lookups", headers=tenants.headers("other"))
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"]
    # A child may not read its parent's limit either.
    up = client.get("/v1/accounts/root/limits/lookups", headers=tenants.headers("child"))
    assert up.status_code == 404
    assert client.get("/v1/accounts/root/limits/lookups").status_code == 401


def test_limits_on_either_store(store: Store, tenants: Tenants) -> None:
    limit = Limit("lim_1", "root", "lookups", 10.0, Period.DAY, thresholds=(50.0, 100.0))
    store.create_limit(limit)
    with pytest.raises(Conflict):
        store.create_limit(Limit("lim_2", "root", "lookups", 5.0))
    assert store.get_limit("root", "lookups") == limit
    changed = Limit("lim_1", "root", "lookups", 20.0, Period.MONTH, "Europe/Berlin", False)
    store.replace_limit(changed)
    assert store.list_limits("root") == [changed] == store.list_limits()
    assert store.list_limits("other") == []
    store.delete_limit("root", "lookups")
    with pytest.raises(NotFound):
        store.get_limit("root", "lookups")


# ---------------------------------------------------------------- periods


NY = parse_zone("America/New_York")


def test_billing_cycle_in_a_zone() -> None:
    account = Account("a", "A", billing_cycle=BillingCycle(datetime(2024, 1, 31).date()))
    limit = Limit("l", "a", "m", 1.0, Period.BILLING_CYCLE, "America/New_York")
    start, end = period_at(limit, account, datetime(2025, 3, 15, 12, tzinfo=UTC))
    assert (start.isoformat(), end.isoformat()) == (
        "2025-02-28T00:00:00-05:00",
        "2025-03-31T00:00:00-04:00",
    )
    no_anchor = Account("b", "B")  # calendar months
    start, end = period_at(limit, no_anchor, datetime(2025, 3, 1, 3, tzinfo=UTC))
    assert start == datetime(2025, 2, 1, tzinfo=NY) and end == datetime(2025, 3, 1, tzinfo=NY)


@settings(max_examples=200, deadline=None)
@given(
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)),
    st.sampled_from(list(Period)),
    st.sampled_from(["UTC", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe"]),
    st.dates(min_value=datetime(2000, 1, 1).date(), max_value=datetime(2030, 12, 31).date()),
)
def test_a_period_holds_its_instant_and_follows_the_last(
    naive: datetime, period: Period, tz: str, anchor: Any
) -> None:
    """Whatever the zone and anchor: the period containing t holds t, and the period that
    starts where it ends is the next one (no gap, no overlap)."""
    account = Account("a", "A", billing_cycle=BillingCycle(anchor))
    limit = Limit("l", "a", "m", 1.0, period, tz)
    at = naive.replace(tzinfo=UTC)
    start, end = period_at(limit, account, at)
    assert start <= at < end
    if period is not Period.TOTAL:
        following = period_at(limit, account, end)
        assert following[0] == end and following[1] > end
        assert period_at(limit, account, end - timedelta(microseconds=1)) == (start, end)


def test_clock_is_what_the_check_reads(
    client: TestClient, op: dict[str, str], tenants: Tenants, clock: Clock, send: Any
) -> None:
    make_limit(client, op, "other", metric="lookups", amount=5, period="day")
    send(event("d1", "other", "lookups", "2025-03-15T01:00:00Z"))
    assert client.get("/v1/accounts/other/limits/lookups", headers=op).json()["used"] == 1
    clock.at = datetime(2025, 3, 16, 0, 30, tzinfo=UTC)
    next_day = client.get("/v1/accounts/other/limits/lookups", headers=op).json()
    assert next_day["used"] == 0 and next_day["period_start"] == "2025-03-16T00:00:00Z"


def test_client_check(client: TestClient, op: dict[str, str], tenants: Tenants, send: Any) -> None:
    make_limit(client, op, "root", metric="lookups", amount=2, action="block")
    usage = UsageClient("http://testserver", tenants.secrets["root"], http=client, background=False)
    usage.record("lookups", ts=datetime(2025, 3, 10, tzinfo=UTC))
    usage.record("lookups", ts=datetime(2025, 3, 11, tzinfo=UTC))
    assert usage.check("lookups", "root")["used"] == 0  # still queued in the client
    usage.flush()
    answer = usage.check("lookups", "root")
    assert (answer["used"], answer["exceeded"], answer["action"]) == (2, True, "block")
    with pytest.raises(UsageError, match="no limit"):
        usage.check("tokens", "root")
    with pytest.raises(UsageError, match="not found"):
        usage.check("lookups", "other")


def test_limits_from_the_command_line(tmp_path: Path) -> None:
    runner = CliRunner()
    db = str(tmp_path / "u.db")

    def run(*args: str) -> Any:
        result = runner.invoke(cli_app, [*args, "--db", db])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    run("accounts", "create", "Acme", "--id", "acme")
    created = run("limits", "set", "acme", "lookups", "1000", "--thresholds", "80,50")
    assert (created["amount"], created["thresholds"]) == (1000, [50, 80])
    replaced = run("limits", "set", "acme", "lookups", "2000", "--period", "day", "--absolute")
    assert replaced["id"] == created["id"] and replaced["period"] == "day"
    assert replaced["threshold_unit"] == "absolute" and replaced["thresholds"] == [100]
    assert [limit["amount"] for limit in run("limits", "list", "--account", "acme")] == [2000]
    bad = runner.invoke(
        cli_app, ["limits", "set", "acme", "x", "0", "--period", "week", "--db", db]
    )
    assert bad.exit_code == 2 and "amount" in bad.output and "period" in bad.output
    ghost = runner.invoke(cli_app, ["limits", "set", "ghost", "x", "5", "--db", db])
    assert ghost.exit_code == 2 and "ghost" in ghost.output
    assert run("limits", "delete", "acme", "lookups")["deleted"] is True
    assert run("limits", "list") == []
    again = runner.invoke(cli_app, ["limits", "delete", "acme", "lookups", "--db", db])
    assert again.exit_code == 2


def test_dashboard_shows_a_limit(client: TestClient, op: dict[str, str], tenants: Tenants) -> None:
    """The page asks the check endpoint (a documented GET) and draws the limit's line."""
    html = client.get("/dashboard").text
    assert '"/v1/accounts/{account_id}/limits/{metric}"' in html
    assert 'id="limit-note"' in html and "limitline" in html
    paths = client.get("/openapi.json").json()["paths"]
    assert "get" in paths["/v1/accounts/{account_id}/limits/{metric}"]


def test_middleware_refuses_an_account_over_its_block_limit(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    make_limit(client, op, "other", metric="requests", amount=2, action="block", period="total")
    make_limit(client, op, "sibling", metric="requests", amount=1, period="total")  # alert only
    usage = UsageClient(
        "http://testserver",
        op["Authorization"].removeprefix("Bearer "),
        http=client,
        background=False,
    )
    hello = Starlette(routes=[Route("/hello", lambda request: PlainTextResponse("hi"))])
    hello.add_middleware(
        UsageMiddleware,
        client=usage,
        account=lambda request: request.headers.get("x-account"),
        block=LimitGate(usage, "requests", ttl_s=0),
    )
    with TestClient(hello) as app:
        for account in ("other", "other", "sibling", "sibling", "root"):
            assert app.get("/hello", headers={"x-account": account}).status_code == 200
        usage.flush()
        refused = app.get("/hello", headers={"x-account": "other"})
        assert refused.status_code == 429
        assert refused.json()["exceeded"] is True and refused.json()["used"] == 2
        # An alert limit never refuses; an account without a limit neither.
        assert app.get("/hello", headers={"x-account": "sibling"}).status_code == 200
        assert app.get("/hello", headers={"x-account": "root"}).status_code == 200
        assert app.get("/hello").status_code == 200  # not metered, not checked
    usage.flush()
    assert client.get("/v1/accounts/other/limits/requests", headers=op).json()["used"] == 2


def test_crossings_and_deliveries_on_either_store(store: Store, tenants: Tenants) -> None:
    """A crossing is recorded once with its deliveries; a due delivery is claimed by one
    worker only (two processes on one database share the deliveries)."""
    crossing = Crossing("thr_1", "lim_1", "root", 1000, 10.0, '{"id": "thr_1"}', 5)
    delivery = Delivery("dlv_1", "thr_1", "wh_1", "root", DeliveryStatus.PENDING, 0, 100, 5)
    assert store.record_crossing(crossing, [delivery]) is True
    again = Delivery("dlv_2", "thr_1", "wh_1", "root", DeliveryStatus.PENDING, 0, 100, 5)
    assert store.record_crossing(crossing, [again]) is False  # nothing of it is kept
    assert [d.id for d in store.list_deliveries()] == ["dlv_1"]
    assert store.due_deliveries(99) == []
    [due] = store.due_deliveries(100)
    assert due.payload == '{"id": "thr_1"}' and due.attempts == 0
    assert store.claim_delivery(due, 5000) is True
    assert store.claim_delivery(due, 6000) is False  # the other worker's claim loses
    assert store.due_deliveries(4999) == []
    store.finish_attempt("dlv_1", DeliveryStatus.PENDING, 200, "HTTP 500", None)
    store.finish_attempt("dlv_1", DeliveryStatus.DELIVERED, 300, None, 300)
    [done] = store.list_deliveries("root")
    assert (done.status, done.attempts, done.delivered_at_ms) == (DeliveryStatus.DELIVERED, 2, 300)
    assert store.list_deliveries("other") == []
    assert store.replay_delivery("dlv_1", 400).status is DeliveryStatus.PENDING
    with pytest.raises(NotFound):
        store.replay_delivery("dlv_nope", 400)


def test_a_misspelled_parameter_is_refused(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    make_limit(client, op, "root", metric="lookups", amount=3)
    check = client.get("/v1/accounts/root/limits/lookups?tz=Europe/Berlin", headers=op)
    assert check.status_code == 400 and "tz" in check.json()["error"]["message"]
    listing = client.get("/v1/webhooks/deliveries?acount=root", headers=op)
    assert listing.status_code == 400 and "'account'" in listing.json()["error"]["message"]


def test_wsgi_middleware_refuses_an_account_over_its_block_limit(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    make_limit(client, op, "other", metric="requests", amount=1, action="block", period="total")
    usage = UsageClient(
        "http://testserver",
        op["Authorization"].removeprefix("Bearer "),
        http=client,
        background=False,
    )

    def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hi"]

    app = WSGIUsageMiddleware(
        hello,
        client=usage,
        account=lambda environ: environ.get("HTTP_X_ACCOUNT"),
        block=LimitGate(usage, "requests", ttl_s=0),
    )
    statuses: list[str] = []

    def call(account: str) -> bytes:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/hello", "HTTP_X_ACCOUNT": account}
        body = b"".join(
            app(environ, lambda status, headers, exc_info=None: statuses.append(status))
        )
        return body

    assert call("other") == b"hi" and call("root") == b"hi"
    usage.flush()
    refused = json.loads(call("other"))
    assert statuses[-1].startswith("429") and refused["exceeded"] is True and refused["used"] == 1
    assert call("root") == b"hi" and statuses[-1].startswith("200")


def test_deliveries_are_listed_in_pages(
    client: TestClient, op: dict[str, str], store: Store, tenants: Tenants
) -> None:
    """Seven deliveries (two sharing a creation time): pages of two, in order, each once;
    a status narrows; bad parameters are each named."""
    made = []
    for i, created in enumerate([5, 6, 6, 7, 8, 9, 10]):
        crossing = Crossing(f"thr_{i}", "lim_1", "root", 1000 + i, 10.0, "{}", created)
        status = DeliveryStatus.FAILED if i % 3 == 0 else DeliveryStatus.PENDING
        delivery = Delivery(f"dlv_{i}", f"thr_{i}", "wh_1", "root", status, 0, 100, created)
        assert store.record_crossing(crossing, [delivery])
        made.append(delivery.id)
    seen: list[str] = []
    url = "/v1/webhooks/deliveries?limit=2"
    while True:
        page = client.get(url, headers=op)
        assert page.status_code == 200, page.text
        ids = [d["id"] for d in page.json()["data"]]
        assert len(ids) <= 2
        seen += ids
        if page.json()["next"] is None:
            break
        assert page.json()["next"] == ids[-1]
        url = f"/v1/webhooks/deliveries?limit=2&after={ids[-1]}"
    assert seen == made
    whole = client.get("/v1/webhooks/deliveries", headers=op).json()
    assert [d["id"] for d in whole["data"]] == made and whole["next"] is None
    failed = client.get("/v1/webhooks/deliveries?status=failed", headers=op).json()["data"]
    assert [d["id"] for d in failed] == ["dlv_0", "dlv_3", "dlv_6"]
    bad = client.get("/v1/webhooks/deliveries?status=lost&limit=0&after=dlv_x", headers=op)
    assert bad.status_code == 400
    assert [e["param"] for e in bad.json()["error"]["details"]["errors"]] == [
        "status",
        "limit",
        "after",
    ]
