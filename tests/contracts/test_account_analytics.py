"""GET /v1/accounts/{account_id}/analytics/usage (seed 003, issue 6), over the real app.

Events go in through POST /v1/events; every expectation below is worked out by hand from
the events sent (bucket boundaries in local time and UTC are spelled out beside them).
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Clock, Tenants, event
from usagemeter.api.app import create_app
from usagemeter.auth import issue_key
from usagemeter.model import Scope
from usagemeter.store.sqlite import SQLiteStore

URL = "/v1/accounts/{}/analytics/usage"
PATH = "/v1/accounts/{account_id}/analytics/usage"
# The test client's response: httpx's or httpx2's, whichever Starlette found installed.
Response = Any


def conv(id: str, account: str, ts: str | int, seconds: float = 1, **dims: str) -> dict[str, Any]:
    return event(id, account, "conversations", ts, value=seconds, dimensions=dims)


def usage(client: TestClient, account: str, secret: str | None, **params: Any) -> Response:
    headers = {} if secret is None else {"X-API-Key": secret}
    return client.get(URL.format(account), params=params, headers=headers)


def ok(client: TestClient, account: str, secret: str, **params: Any) -> dict[str, Any]:
    response = usage(client, account, secret, **params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def stamps(body: dict[str, Any]) -> list[str]:
    return [b["ts"] for b in body["data"]]


def counts(body: dict[str, Any]) -> list[int]:
    return [sum(v["conversations"] for v in b["values"]) for b in body["data"]]


def seconds(body: dict[str, Any]) -> list[float]:
    return [sum(v["seconds"] for v in b["values"]) for b in body["data"]]


def issues(response: Response) -> list[tuple[tuple[str, ...], str]]:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    for item in detail:
        assert set(item) <= {"loc", "msg", "type", "input"}
        assert item["msg"]
    return [(tuple(item["loc"]), item["type"]) for item in detail]


@pytest.fixture
def root(tenants: Tenants) -> str:
    return tenants.secrets["root"]


# ---------------------------------------------------------------- UTC granularities


def test_hour_buckets_in_utc(client: TestClient, send: Any, root: str) -> None:
    send(
        conv("before", "root", "2024-04-30T23:59:59.999Z"),
        conv("at-start", "root", "2024-05-01T00:00:00Z", 30),
        conv("end-of-hour", "root", "2024-05-01T01:59:59.999Z", 45.5),
        conv("third", "root", "2024-05-01T03:30:00Z", 10),
        conv("at-end", "root", "2024-05-01T04:00:00Z"),
    )
    body = ok(
        client,
        "root",
        root,
        start="2024-05-01T00:00:00Z",
        end="2024-05-01T04:00:00Z",
        granularity="hour",
    )
    assert body["meta"] == {
        "account_id": "root",
        "start": "2024-05-01T00:00:00Z",
        "end": "2024-05-01T04:00:00Z",
        "granularity": "hour",
        "group_by": [],
        "tz": "UTC",
    }
    assert stamps(body) == [f"2024-05-01T0{h}:00:00Z" for h in range(4)]
    assert [b["values"] for b in body["data"]] == [
        [{"seconds": 30, "conversations": 1, "dimensions": {}}],
        [{"seconds": 45.5, "conversations": 1, "dimensions": {}}],
        [{"seconds": 0, "conversations": 0, "dimensions": {}}],  # idle: zeros, not absent
        [{"seconds": 10, "conversations": 1, "dimensions": {}}],
    ]


def test_day_buckets_in_utc_are_the_default(client: TestClient, send: Any, root: str) -> None:
    send(
        conv("d1", "root", "2024-05-01T00:00:00Z", 1.25),
        conv("d2", "root", "2024-05-01T23:59:59Z", 2.25),
        conv("d3", "root", "2024-05-03T12:00:00Z", 7),
    )
    body = ok(client, "root", root, start="2024-05-01T00:00:00Z", end="2024-05-04T00:00:00Z")
    assert body["meta"]["granularity"] == "day"
    assert stamps(body) == ["2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z", "2024-05-03T00:00:00Z"]
    assert counts(body) == [2, 0, 1]
    # Fractions add up to a whole number: rendered as an integer, not 3.5-style floats.
    first = body["data"][0]["values"][0]
    assert first["seconds"] == 3.5
    assert body["data"][2]["values"][0]["seconds"] == 7
    assert isinstance(body["data"][2]["values"][0]["seconds"], int)


def test_month_buckets_in_utc(client: TestClient, send: Any, root: str) -> None:
    send(
        conv("jan", "root", "2024-01-31T23:59:59Z"),
        conv("feb-29", "root", "2024-02-29T23:59:59Z"),
        conv("mar-1", "root", "2024-03-01T00:00:00Z"),
        conv("mar-31", "root", "2024-03-31T12:00:00Z"),
    )
    body = ok(
        client,
        "root",
        root,
        start="2024-01-01T00:00:00Z",
        end="2024-04-01T00:00:00Z",
        granularity="month",
    )
    assert stamps(body) == ["2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"]
    assert counts(body) == [1, 1, 2]


def test_only_conversations_count(client: TestClient, send: Any, root: str) -> None:
    send(
        conv("c", "root", "2024-05-01T10:00:00Z", 60),
        event("r", "root", "requests", "2024-05-01T10:00:00Z"),
        event("l", "root", "lookups", "2024-05-01T10:00:00Z"),
    )
    body = ok(client, "root", root, start="2024-05-01T00:00:00Z", end="2024-05-02T00:00:00Z")
    assert body["data"][0]["values"] == [{"seconds": 60, "conversations": 1, "dimensions": {}}]


# ------------------------------------------------------------------- DST and offsets


def test_new_york_spring_forward_day_has_23_hours(client: TestClient, send: Any, root: str) -> None:
    # 2024-03-10: 01:59:59-05:00 is followed by 03:00-04:00 (07:00Z); there is no 02:00.
    send(
        conv("one-thirty", "root", "2024-03-10T06:30:00Z"),  # 01:30-05:00
        conv("three", "root", "2024-03-10T07:00:00Z"),  # 03:00-04:00
        conv("late", "root", "2024-03-11T03:59:59Z"),  # 23:59:59-04:00
    )
    body = ok(
        client,
        "root",
        root,
        start="2024-03-10T00:00",
        end="2024-03-11T00:00",
        tz="America/New_York",
        granularity="hour",
    )
    expected = ["2024-03-10T00:00:00-05:00", "2024-03-10T01:00:00-05:00"] + [
        f"2024-03-10T{h:02d}:00:00-04:00" for h in range(3, 24)
    ]
    assert stamps(body) == expected
    assert len(expected) == 23
    assert body["meta"]["start"] == "2024-03-10T00:00:00-05:00"
    assert body["meta"]["end"] == "2024-03-11T00:00:00-04:00"
    assert counts(body)[1] == 1 and counts(body)[2] == 1 and counts(body)[-1] == 1
    assert sum(counts(body)) == 3

    # Day buckets: the 10th runs from 05:00Z to 04:00Z the next day (23 hours).
    send(conv("edt-day", "root", "2024-03-11T03:30:00Z"), conv("next", "root", "2024-03-11T04:00Z"))
    days = ok(client, "root", root, start="2024-03-09", end="2024-03-12", tz="America/New_York")
    assert stamps(days) == [
        "2024-03-09T00:00:00-05:00",
        "2024-03-10T00:00:00-05:00",
        "2024-03-11T00:00:00-04:00",
    ]
    assert counts(days) == [0, 4, 1]


def test_new_york_fall_back_has_two_one_oclock_hours(
    client: TestClient, send: Any, root: str
) -> None:
    # 2024-11-03: 01:00-04:00 (05:00Z) and 01:00-05:00 (06:00Z) both read 01:00.
    send(
        conv("first-one", "root", "2024-11-03T05:30:00Z", 10),
        conv("second-one", "root", "2024-11-03T06:30:00Z", 20),
        conv("second-one-b", "root", "2024-11-03T06:59:59.999Z", 1),
    )
    body = ok(
        client,
        "root",
        root,
        start="2024-11-03T00:00:00-04:00",
        end="2024-11-04T00:00:00-05:00",
        tz="America/New_York",
        granularity="hour",
    )
    ts = stamps(body)
    assert len(ts) == 25
    assert ts[:4] == [
        "2024-11-03T00:00:00-04:00",
        "2024-11-03T01:00:00-04:00",
        "2024-11-03T01:00:00-05:00",
        "2024-11-03T02:00:00-05:00",
    ]
    assert ts[-1] == "2024-11-03T23:00:00-05:00"
    assert seconds(body)[1:3] == [10, 21]
    assert counts(body)[1:3] == [1, 2]

    # The day is 25 hours: 04:00Z to 05:00Z next day.
    send(
        conv("edge-in", "root", "2024-11-04T04:59:59Z"),
        conv("edge-out", "root", "2024-11-04T05:00Z"),
    )
    days = ok(client, "root", root, start="2024-11-03", end="2024-11-05", tz="America/New_York")
    assert stamps(days) == ["2024-11-03T00:00:00-04:00", "2024-11-04T00:00:00-05:00"]
    assert counts(days) == [4, 1]


def test_kolkata_hours_start_at_half_past_utc(client: TestClient, send: Any, root: str) -> None:
    # +05:30: 00:00Z is 05:30 local, so the first bucket is clipped and whole local hours
    # (06:00, 07:00, ...) begin at :30 UTC.
    send(
        conv("k1", "root", "2024-05-01T00:29:59.999Z"),
        conv("k2", "root", "2024-05-01T00:30:00Z"),
        conv("k3", "root", "2024-05-01T02:45:00Z"),
    )
    body = ok(
        client,
        "root",
        root,
        start="2024-05-01T00:00:00Z",
        end="2024-05-01T03:00:00Z",
        tz="Asia/Kolkata",
        granularity="hour",
    )
    assert stamps(body) == [
        "2024-05-01T05:30:00+05:30",
        "2024-05-01T06:00:00+05:30",
        "2024-05-01T07:00:00+05:30",
        "2024-05-01T08:00:00+05:30",
    ]
    assert counts(body) == [1, 1, 0, 1]
    assert body["meta"]["start"] == "2024-05-01T05:30:00+05:30"
    assert body["meta"]["end"] == "2024-05-01T08:30:00+05:30"

    # A Kolkata day begins at 18:30Z the day before.
    send(conv("k-day", "root", "2024-05-01T18:30:00Z"))
    days = ok(client, "root", root, start="2024-05-01", end="2024-05-03", tz="Asia/Kolkata")
    assert stamps(days) == ["2024-05-01T00:00:00+05:30", "2024-05-02T00:00:00+05:30"]
    assert counts(days) == [3, 1]


def test_kathmandu_hours_start_at_quarter_past_utc(
    client: TestClient, send: Any, root: str
) -> None:
    # +05:45: 00:00Z is 05:45 local; 06:00 local is 00:15Z.
    send(
        conv("n1", "root", "2024-05-01T00:14:59Z"),
        conv("n2", "root", "2024-05-01T00:15:00Z"),
        conv("n3", "root", "2024-05-01T01:15:00Z"),
    )
    body = ok(
        client,
        "root",
        root,
        start="2024-05-01T00:00:00Z",
        end="2024-05-01T02:00:00Z",
        tz="Asia/Kathmandu",
        granularity="hour",
    )
    assert stamps(body) == [
        "2024-05-01T05:45:00+05:45",
        "2024-05-01T06:00:00+05:45",
        "2024-05-01T07:00:00+05:45",
    ]
    assert counts(body) == [1, 1, 1]
    assert body["meta"]["end"] == "2024-05-01T07:45:00+05:45"


def test_berlin_months_start_at_23_or_22_utc(client: TestClient, send: Any, root: str) -> None:
    # Berlin is +01:00 in winter and +02:00 from 2024-03-31 01:00Z: January to March begin
    # at 23:00Z the day before, April and May at 22:00Z.
    send(
        conv("too-early", "root", "2023-12-31T22:59:59Z"),
        conv("jan-first", "root", "2023-12-31T23:00:00Z"),
        conv("mar-last", "root", "2024-03-31T21:59:59Z"),
        conv("apr-first", "root", "2024-03-31T22:00:00Z"),
        conv("may-last", "root", "2024-05-31T21:59:59Z"),
        conv("june", "root", "2024-05-31T22:00:00Z"),
    )
    body = ok(
        client,
        "root",
        root,
        start="2024-01-01T00:00",
        end="2024-06-01T00:00",
        tz="Europe/Berlin",
        granularity="month",
    )
    assert stamps(body) == [
        "2024-01-01T00:00:00+01:00",
        "2024-02-01T00:00:00+01:00",
        "2024-03-01T00:00:00+01:00",
        "2024-04-01T00:00:00+02:00",
        "2024-05-01T00:00:00+02:00",
    ]
    assert counts(body) == [1, 0, 1, 1, 1]
    assert body["meta"]["start"] == "2024-01-01T00:00:00+01:00"
    assert body["meta"]["end"] == "2024-06-01T00:00:00+02:00"


# ------------------------------------------------------------------------- clipping


def test_first_and_last_buckets_are_clipped(client: TestClient, send: Any, root: str) -> None:
    send(
        conv("c0", "root", "2024-05-01T10:14:59.999Z"),
        conv("c1", "root", "2024-05-01T10:15:00Z"),
        conv("c2", "root", "2024-05-02T12:00:00Z"),
        conv("c3", "root", "2024-05-03T05:59:59.999Z"),
        conv("c4", "root", "2024-05-03T06:00:00Z"),
    )
    body = ok(client, "root", root, start="2024-05-01T10:15:00Z", end="2024-05-03T06:00:00Z")
    assert stamps(body) == ["2024-05-01T10:15:00Z", "2024-05-02T00:00:00Z", "2024-05-03T00:00:00Z"]
    assert counts(body) == [1, 1, 1]

    # Clipped in a zone too: start and end given with another offset are shown in tz.
    month = ok(
        client,
        "root",
        root,
        start="2024-05-01T12:15:00+02:00",
        end="2024-05-03T06:00:00Z",
        tz="Asia/Kolkata",
        granularity="month",
    )
    assert stamps(month) == ["2024-05-01T15:45:00+05:30"]
    assert month["meta"]["start"] == "2024-05-01T15:45:00+05:30"
    assert month["meta"]["end"] == "2024-05-03T11:30:00+05:30"
    assert counts(month) == [3]


# ------------------------------------------------------------------------- grouping


def test_group_by_one_dimension(client: TestClient, send: Any, root: str) -> None:
    send(
        conv("g1", "root", "2024-05-01T01:00:00Z", 10, agent="a2"),
        conv("g2", "root", "2024-05-01T02:00:00Z", 20, agent="a1"),
        conv("g3", "root", "2024-05-01T03:00:00Z", 30, agent="a1"),
        conv("g4", "root", "2024-05-01T04:00:00Z", 5),  # no agent
        conv("g5", "root", "2024-05-03T04:00:00Z", 1.5, agent="a1"),
    )
    body = ok(
        client,
        "root",
        root,
        start="2024-05-01T00:00:00Z",
        end="2024-05-04T00:00:00Z",
        group_by="agent",
    )
    assert body["meta"]["group_by"] == ["agent"]
    assert [b["values"] for b in body["data"]] == [
        [
            {"seconds": 50, "conversations": 2, "dimensions": {"agent": "a1"}},
            {"seconds": 10, "conversations": 1, "dimensions": {"agent": "a2"}},
            {"seconds": 5, "conversations": 1, "dimensions": {"agent": None}},
        ],
        [],  # grouped and idle: no entries, the bucket still appears
        [{"seconds": 1.5, "conversations": 1, "dimensions": {"agent": "a1"}}],
    ]


def test_group_by_several_dimensions(client: TestClient, send: Any, root: str) -> None:
    send(
        conv("s1", "root", "2024-05-01T01:00:00Z", 10, agent="a1", type="inbound"),
        conv("s2", "root", "2024-05-01T02:00:00Z", 20, agent="a1", type="outbound"),
        conv("s3", "root", "2024-05-01T03:00:00Z", 30, agent="a1", type="inbound"),
        conv("s4", "child", "2024-05-01T04:00:00Z", 40, agent="a2", type="inbound"),
        conv("s5", "grandchild", "2024-05-01T05:00:00Z", 50, type="inbound"),
    )
    want = [
        {"seconds": 40, "conversations": 2, "dimensions": {"agent": "a1", "type": "inbound"}},
        {"seconds": 20, "conversations": 1, "dimensions": {"agent": "a1", "type": "outbound"}},
        {"seconds": 40, "conversations": 1, "dimensions": {"agent": "a2", "type": "inbound"}},
        {"seconds": 50, "conversations": 1, "dimensions": {"agent": None, "type": "inbound"}},
    ]
    window = {"start": "2024-05-01T00:00:00Z", "end": "2024-05-02T00:00:00Z"}
    comma = ok(client, "root", root, group_by="agent,type", **window)
    assert comma["meta"]["group_by"] == ["agent", "type"]
    assert comma["data"][0]["values"] == want
    # Repeated, mixed with commas, with spaces and repeats: the same groups, request order.
    repeated = ok(client, "root", root, group_by=["agent", " type ,agent", "type"], **window)
    assert repeated["meta"]["group_by"] == ["agent", "type"]
    assert repeated["data"] == comma["data"]
    # The order of the request is the order of meta.group_by.
    swapped = ok(client, "root", root, group_by="type,agent", **window)
    assert swapped["meta"]["group_by"] == ["type", "agent"]

    def rows(values: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted(
            (
                str(v["dimensions"]["agent"]),
                v["dimensions"]["type"],
                v["conversations"],
                v["seconds"],
            )
            for v in values
        )

    assert rows(swapped["data"][0]["values"]) == rows(want)

    three = ok(client, "root", root, group_by="subaccount,agent,type", **window)
    assert [v["dimensions"] for v in three["data"][0]["values"]] == [
        {"subaccount": "child", "agent": "a2", "type": "inbound"},
        {"subaccount": "grandchild", "agent": None, "type": "inbound"},
        {"subaccount": "root", "agent": "a1", "type": "inbound"},
        {"subaccount": "root", "agent": "a1", "type": "outbound"},
    ]
    assert sum(v["seconds"] for v in three["data"][0]["values"]) == 150


# ------------------------------------------------------------- subaccounts, tenancy


@pytest.fixture
def tree(tenants: Tenants, send: Any) -> None:
    # root ── child ── grandchild, root ── sibling, and an unrelated "other".
    send(
        conv("t-root", "root", "2024-05-01T01:00:00Z", 1),
        conv("t-child", "child", "2024-05-01T02:00:00Z", 10),
        conv("t-grand-1", "grandchild", "2024-05-01T03:00:00Z", 100),
        conv("t-grand-2", "grandchild", "2024-05-02T03:00:00Z", 200),
        conv("t-sibling", "sibling", "2024-05-01T04:00:00Z", 1000),
        conv("t-other", "other", "2024-05-01T05:00:00Z", 10000),
    )


WINDOW = {"start": "2024-05-01T00:00:00Z", "end": "2024-05-03T00:00:00Z"}


def by_subaccount(body: dict[str, Any]) -> list[list[tuple[str, int, float]]]:
    return [
        [(v["dimensions"]["subaccount"], v["conversations"], v["seconds"]) for v in b["values"]]
        for b in body["data"]
    ]


@pytest.mark.usefixtures("tree")
def test_usage_includes_every_descendant(client: TestClient, tenants: Tenants) -> None:
    root = ok(client, "root", tenants.secrets["root"], **WINDOW)
    assert counts(root) == [4, 1]
    assert seconds(root) == [1111, 200]
    child = ok(client, "child", tenants.secrets["child"], **WINDOW)
    assert seconds(child) == [110, 200]
    grand = ok(client, "grandchild", tenants.secrets["grandchild"], **WINDOW)
    assert seconds(grand) == [100, 200]


@pytest.mark.usefixtures("tree")
def test_group_by_subaccount_three_levels(client: TestClient, tenants: Tenants) -> None:
    root = ok(client, "root", tenants.secrets["root"], group_by="subaccount", **WINDOW)
    assert by_subaccount(root) == [
        [("child", 1, 10), ("grandchild", 1, 100), ("root", 1, 1), ("sibling", 1, 1000)],
        [("grandchild", 1, 200)],
    ]
    # The parent's key may read the child: the child's view is its own subtree.
    child = ok(client, "child", tenants.secrets["root"], group_by="subaccount", **WINDOW)
    assert by_subaccount(child) == [
        [("child", 1, 10), ("grandchild", 1, 100)],
        [("grandchild", 1, 200)],
    ]
    assert child == ok(client, "child", tenants.secrets["child"], group_by="subaccount", **WINDOW)
    grand = ok(client, "grandchild", tenants.secrets["child"], group_by="subaccount", **WINDOW)
    assert by_subaccount(grand) == [[("grandchild", 1, 100)], [("grandchild", 1, 200)]]


UNREADABLE = [
    ("child", "root"),  # a parent
    ("child", "sibling"),  # a sibling
    ("grandchild", "child"),  # its parent
    ("grandchild", "root"),  # its grandparent
    ("sibling", "grandchild"),  # a cousin
    ("other", "root"),  # another tenant
    ("root", "other"),
    ("root", "nope"),  # does not exist: the same answer
]


# Cases share one server (a loop, not parametrize): each app start costs more than the cases.
@pytest.mark.usefixtures("tree")
def test_unreadable_accounts_are_not_found(client: TestClient, tenants: Tenants) -> None:
    for caller, account in UNREADABLE:
        response = usage(client, account, tenants.secrets[caller], **WINDOW)
        assert response.status_code == 404, (caller, account, response.text)
        assert response.json() == {"detail": f"account {account!r} not found"}


@pytest.mark.usefixtures("tree")
def test_operator_reads_any_account(
    client: TestClient, tenants: Tenants, operator_secret: str
) -> None:
    assert seconds(ok(client, "other", operator_secret, **WINDOW)) == [10000, 0]
    assert seconds(ok(client, "root", operator_secret, **WINDOW)) == [1111, 200]
    missing = usage(client, "nope", operator_secret, **WINDOW)
    assert missing.status_code == 404
    assert missing.json() == {"detail": "account 'nope' not found"}


def test_a_key_without_read_scope_reads_nothing(
    client: TestClient, store: SQLiteStore, tenants: Tenants
) -> None:
    _, secret = issue_key(store, "root", scopes=[Scope.INGEST])
    response = usage(client, "root", secret, **WINDOW)
    assert response.status_code == 404
    assert response.json() == {"detail": "account 'root' not found"}


# ---------------------------------------------------------------------------- limit


def test_limit_keeps_the_earliest_buckets(client: TestClient, send: Any, root: str) -> None:
    send(
        conv("l-first", "root", "2024-05-01T00:30:00Z"),
        conv("l-fifth", "root", "2024-05-01T04:59:59Z"),
        conv("l-sixth", "root", "2024-05-01T05:00:00Z"),
    )
    body = ok(
        client,
        "root",
        root,
        start="2024-05-01T00:00:00Z",
        end="2024-05-03T00:00:00Z",
        granularity="hour",
        limit="5",
    )
    assert stamps(body) == [f"2024-05-01T0{h}:00:00Z" for h in range(5)]
    assert counts(body) == [1, 0, 0, 0, 1]
    assert body["meta"]["end"] == "2024-05-03T00:00:00Z"  # the range asked, not the cut
    one = ok(
        client,
        "root",
        root,
        start="2024-05-01T00:00:00Z",
        end="2024-05-03T00:00:00Z",
        granularity="hour",
        limit="1",
    )
    assert stamps(one) == ["2024-05-01T00:00:00Z"]
    # A limit above the number of buckets changes nothing.
    all_ = ok(
        client,
        "root",
        root,
        start="2024-05-01T00:00:00Z",
        end="2024-05-03T00:00:00Z",
        granularity="hour",
        limit="500",
    )
    assert len(all_["data"]) == 48
    assert sum(counts(all_)) == 3


def test_limit_defaults_to_500(client: TestClient, root: str) -> None:
    # 30 days of hours is 720 buckets; 500 come back, the earliest first.
    body = ok(
        client,
        "root",
        root,
        start="2024-05-01T00:00:00Z",
        end="2024-05-31T00:00:00Z",
        granularity="hour",
    )
    assert len(body["data"]) == 500
    assert body["data"][-1]["ts"] == "2024-05-21T19:00:00Z"  # 499 hours after the start


def test_limit_over_a_long_range_in_a_dst_zone(client: TestClient, send: Any, root: str) -> None:
    # Two centuries of hours: only the buckets kept are laid out. The cut crosses the
    # 2000 New York spring change (2000-04-02, 02:00 EST -> 03:00 EDT).
    send(conv("y2000", "root", "2000-04-02T07:00:00Z"))
    body = ok(
        client,
        "root",
        root,
        start="2000-03-28T00:00",
        end="2199-12-31T00:00",
        tz="America/New_York",
        granularity="hour",
        limit="200",
    )
    ts = stamps(body)
    assert len(ts) == 200
    assert ts[0] == "2000-03-28T00:00:00-05:00"
    assert "2000-04-02T01:00:00-05:00" in ts and "2000-04-02T03:00:00-04:00" in ts
    assert "2000-04-02T02:00:00-05:00" not in ts
    # 199 hours after the start, and the wall clock skipped one: 08:00, not 07:00.
    assert ts[-1] == "2000-04-05T08:00:00-04:00"
    assert sum(counts(body)) == 1
    assert body["data"][ts.index("2000-04-02T03:00:00-04:00")]["values"][0]["conversations"] == 1
    assert body["meta"]["end"] == "2199-12-31T00:00:00-05:00"


# ---------------------------------------------------------------- defaults, parsing


def test_default_range_is_the_30_days_before_now(
    client: TestClient, clock: Clock, send: Any, root: str
) -> None:
    clock.at = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
    send(
        conv("old", "root", "2025-02-13T11:59:59Z"),
        conv("first", "root", "2025-02-13T12:00:00Z"),
        conv("last", "root", "2025-03-15T11:59:59Z"),
        conv("future", "root", "2025-03-15T12:00:00Z"),
    )
    body = ok(client, "root", root)
    assert body["meta"]["start"] == "2025-02-13T12:00:00Z"
    assert body["meta"]["end"] == "2025-03-15T12:00:00Z"
    assert body["meta"]["tz"] == "UTC" and body["meta"]["granularity"] == "day"
    ts = stamps(body)
    assert len(ts) == 31  # a clipped half day, 29 whole days, a clipped half day
    assert ts[0] == "2025-02-13T12:00:00Z" and ts[1] == "2025-02-14T00:00:00Z"
    assert ts[-1] == "2025-03-15T00:00:00Z"
    assert counts(body)[0] == 1 and counts(body)[-1] == 1 and sum(counts(body)) == 2

    only_end = ok(client, "root", root, end="2025-01-31T00:00:00Z")
    assert only_end["meta"]["start"] == "2025-01-01T00:00:00Z"
    only_start = ok(client, "root", root, start="2025-03-01T00:00:00Z")
    assert only_start["meta"]["end"] == "2025-03-15T12:00:00Z"


def test_default_start_is_30_local_days_in_a_dst_zone(
    client: TestClient, clock: Clock, root: str
) -> None:
    # Now is local midnight in New York, after the 2025-03-09 change: 30 days back is
    # local midnight again (-05:00), so every day bucket is whole.
    clock.at = datetime(2025, 3, 15, 4, 0, tzinfo=UTC)
    body = ok(client, "root", root, tz="America/New_York")
    assert body["meta"]["start"] == "2025-02-13T00:00:00-05:00"
    assert body["meta"]["end"] == "2025-03-15T00:00:00-04:00"
    assert len(body["data"]) == 30
    assert all(ts[11:19] == "00:00:00" for ts in stamps(body))


def test_instants_naive_in_tz_offset_given_or_dates(client: TestClient, root: str) -> None:
    # Naive: read in tz. A wall time skipped by DST (02:30 on 2024-03-10) reads as 03:30-04:00.
    body = ok(
        client,
        "root",
        root,
        start="2024-03-10T02:30:00",
        end="2024-03-10T05:00",
        tz="America/New_York",
        granularity="hour",
    )
    assert body["meta"]["start"] == "2024-03-10T03:30:00-04:00"
    assert stamps(body) == ["2024-03-10T03:30:00-04:00", "2024-03-10T04:00:00-04:00"]
    # An offset wins over tz; the range is shown in tz.
    given = ok(client, "root", root, start="2024-05-01T00:00:00+05:30", end="2024-05-01T00:00:00Z")
    assert given["meta"]["start"] == "2024-04-30T18:30:00Z"
    assert stamps(given) == ["2024-04-30T18:30:00Z"]
    # A date is that day's start in tz.
    dates = ok(client, "root", root, start="2024-05-01", end="2024-05-02", tz="Asia/Kathmandu")
    assert dates["meta"]["start"] == "2024-05-01T00:00:00+05:45"
    assert stamps(dates) == ["2024-05-01T00:00:00+05:45"]


# --------------------------------------------------------------------------- errors


def test_missing_or_invalid_key_is_401(
    client: TestClient, store: SQLiteStore, tenants: Tenants
) -> None:
    missing = usage(client, "root", None, **WINDOW)
    assert missing.status_code == 401
    assert "X-API-Key" in missing.json()["detail"]
    blank = client.get(URL.format("root"), headers={"X-API-Key": "  "})
    assert blank.status_code == 401
    wrong = usage(client, "root", "ak_not_a_key", **WINDOW)
    assert wrong.status_code == 401
    assert wrong.json() == {"detail": "invalid API key"}
    # The contract's header is X-API-Key; a bearer token is not read here.
    bearer = client.get(URL.format("root"), headers=tenants.headers("root"))
    assert bearer.status_code == 401
    store.revoke_key(tenants.key_ids["root"])
    revoked = usage(client, "root", tenants.secrets["root"], **WINDOW)
    assert revoked.status_code == 401
    # The key is checked first: bad parameters and an unknown account still answer 401.
    assert usage(client, "nope", None, tz="Mars/Base").status_code == 401


def test_parameters_are_checked_before_tenancy(client: TestClient, tenants: Tenants) -> None:
    # 401, then 422, then 404 (FastAPI's order); a 422 says nothing about the account.
    response = usage(client, "other", tenants.secrets["root"], tz="Mars/Base")
    assert issues(response) == [(("query", "tz"), "value_error")]


INVERTED = [
    {"start": "2024-05-02T00:00:00Z", "end": "2024-05-01T00:00:00Z"},
    {"start": "2024-05-01T00:00:00Z", "end": "2024-05-01T00:00:00Z"},  # empty
    {"start": "2024-05-01T01:00:00+01:00", "end": "2024-05-01T00:00:00Z"},  # the same instant
    {"start": "2030-01-01T00:00:00Z"},  # after the default end (now)
]


def test_start_must_be_before_end(client: TestClient, root: str) -> None:
    for params in INVERTED:
        response = usage(client, "root", root, **params)
        assert issues(response) == [(("query", "start"), "value_error")], params
        assert "before end" in response.json()["detail"][0]["msg"]


INVALID: list[tuple[dict[str, str], str, str]] = [
    ({"start": "yesterday"}, "start", "datetime_from_date_parsing"),
    ({"start": "2024-13-01T00:00:00Z"}, "start", "datetime_from_date_parsing"),
    ({"start": "1714521600000"}, "start", "datetime_from_date_parsing"),  # epoch ms
    ({"end": "2024-05-01T25:00:00Z"}, "end", "datetime_from_date_parsing"),
    ({"end": ""}, "end", "datetime_from_date_parsing"),
    ({"start": "1960-01-01T00:00:00Z"}, "start", "value_error"),
    ({"end": "2300-01-01T00:00:00Z"}, "end", "value_error"),
    ({"tz": "Mars/Base"}, "tz", "value_error"),
    ({"tz": "../etc/passwd"}, "tz", "value_error"),
    ({"tz": ""}, "tz", "value_error"),
    ({"tz": "America"}, "tz", "value_error"),
    ({"granularity": "week"}, "granularity", "enum"),
    ({"granularity": "total"}, "granularity", "enum"),
    ({"granularity": "Day"}, "granularity", "enum"),
    ({"group_by": "agent,region"}, "group_by", "enum"),
    ({"limit": "ten"}, "limit", "int_parsing"),
    ({"limit": "1.5"}, "limit", "int_parsing"),
    ({"limit": ""}, "limit", "int_parsing"),
    ({"limit": "0"}, "limit", "greater_than_equal"),
    ({"limit": "-3"}, "limit", "greater_than_equal"),
    ({"limit": "501"}, "limit", "less_than_equal"),
]


def test_each_invalid_parameter_is_422(client: TestClient, root: str) -> None:
    for params, loc, type_ in INVALID:
        response = usage(client, "root", root, **params)
        assert issues(response) == [(("query", loc), type_)], params


def test_every_problem_is_reported_at_once(client: TestClient, root: str) -> None:
    response = usage(
        client,
        "root",
        root,
        start="soon",
        end="2024-05-01T00:00:00Z",
        granularity="minute",
        group_by=["agent", "planet", "colour"],
        tz="Mars/Base",
        limit="1000",
    )
    assert issues(response) == [
        (("query", "tz"), "value_error"),
        (("query", "start"), "datetime_from_date_parsing"),
        (("query", "granularity"), "enum"),
        (("query", "group_by"), "enum"),
        (("query", "group_by"), "enum"),
        (("query", "limit"), "less_than_equal"),
    ]
    detail = response.json()["detail"]
    assert detail[0]["input"] == "Mars/Base"
    assert "America/New_York" in detail[0]["msg"]  # says what to use instead
    assert [d["input"] for d in detail[3:5]] == ["planet", "colour"]
    assert "'agent', 'subaccount' or 'type'" in detail[3]["msg"]


def test_endpoint_is_in_the_openapi_document(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    operation = doc["paths"][PATH]["get"]
    names = {p["name"]: p["in"] for p in operation["parameters"]}
    assert names == {
        "account_id": "path",
        "start": "query",
        "end": "query",
        "granularity": "query",
        "group_by": "query",
        "tz": "query",
        "limit": "query",
    }
    assert all(p.get("description") for p in operation["parameters"])
    assert {"200", "401", "404", "422"} <= set(operation["responses"])
    assert operation["summary"] and operation["tags"]
    scheme = next(iter(operation["security"][0]))
    security = doc["components"]["securitySchemes"][scheme]
    assert (security["type"], security["in"], security["name"]) == ("apiKey", "header", "X-API-Key")
    body = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"meta", "data"}


# ------------------------------------------------------------------- the invariant

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/St_Johns",  # -03:30 / -02:30
    "Australia/Lord_Howe",  # moves by 30 minutes
    "Pacific/Chatham",  # +12:45 / +13:45
]
# Around the 2024 changes of New York, Berlin, Lord Howe and Chatham.
# Two days before the 2024 changes of the zones above (New York and St John's 03-10 and
# 11-03, Berlin 03-31 and 10-27, Lord Howe and Chatham 04-07, Chatham 09-29, Lord Howe 10-06).
BASES = [
    datetime(2024, m, d, tzinfo=UTC)
    for m, d in [(3, 8), (3, 29), (4, 5), (9, 27), (10, 4), (10, 25), (11, 1), (1, 1)]
]
QUARTER_MS = 15 * 60 * 1000  # every zone's boundaries fall on whole quarter hours UTC
SPAN_MS = {"hour": 4 * 86_400_000, "day": 100 * 86_400_000, "month": 900 * 86_400_000}
_accounts = itertools.count()


@pytest.fixture
def client(store: SQLiteStore, clock: Clock) -> Iterator[TestClient]:
    """The usual app, but taking events from any date ahead: the month scenarios reach 900
    days past their 2024 bases, beyond the wall clock that ingest checks timestamps against."""
    with TestClient(create_app(store, now=clock, max_future=timedelta(days=3650))) as c:
        yield c


def _ms(ts: str) -> int:
    return (datetime.fromisoformat(ts) - EPOCH) // timedelta(milliseconds=1)


def _iso(ms: int) -> str:
    return (EPOCH + timedelta(milliseconds=ms)).isoformat()


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    granularity = draw(st.sampled_from(["hour", "day", "month"]))
    span = SPAN_MS[granularity]
    base = (draw(st.sampled_from(BASES)) - EPOCH) // timedelta(milliseconds=1)
    # Quarter hours (on a boundary, in any zone, or not) and any millisecond in between.
    instant = st.integers(0, span // QUARTER_MS).map(lambda k: base + k * QUARTER_MS) | st.integers(
        base, base + span
    )
    start, end = sorted(draw(st.lists(instant, min_size=2, max_size=2, unique=True)))
    stamps_ = draw(
        st.lists(st.one_of(instant, st.sampled_from([start, end, end - 1])), max_size=25)
    )
    events = [
        (
            ms,
            draw(st.sampled_from([1, 2.5, 60, 0.25])),
            draw(st.sampled_from([None, "a1", "a2"])),
            draw(st.sampled_from([None, "inbound", "outbound"])),
        )
        for ms in stamps_
    ]
    return {
        "zone": draw(st.sampled_from(ZONES)),
        "granularity": granularity,
        "start": start,
        "end": end,
        "events": events,
        "limit": draw(st.integers(1, 40)),
    }


@settings(
    max_examples=40,
    deadline=None,
    # The examples share one server and store; each writes to an account of its own.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios())
def test_each_event_is_counted_once_in_its_bucket(
    client: TestClient, op: dict[str, str], operator_secret: str, scenario: dict[str, Any]
) -> None:
    account = f"prop{next(_accounts)}"
    created = client.post("/v1/accounts", json={"id": account, "name": account}, headers=op)
    assert created.status_code == 201, created.text
    sub = f"{account}-sub"
    created = client.post(
        "/v1/accounts", json={"id": sub, "name": sub, "parent_id": account}, headers=op
    )
    assert created.status_code == 201, created.text
    events = []
    for i, (ms, value, agent, type_) in enumerate(scenario["events"]):
        dims = {k: v for k, v in (("agent", agent), ("type", type_)) if v is not None}
        events.append(conv(f"e{i}", sub if i % 3 == 0 else account, ms, value, **dims))
    if events:
        posted = client.post("/v1/events", json=events, headers=op)
        assert posted.status_code == 200, posted.text

    start, end = scenario["start"], scenario["end"]
    params = {
        "start": _iso(start),
        "end": _iso(end),
        "tz": scenario["zone"],
        "granularity": scenario["granularity"],
    }
    body = ok(client, account, operator_secret, **params)
    starts = [_ms(ts) for ts in stamps(body)]
    assert len(starts) < 500  # the spans above keep every bucket
    assert starts[0] == start
    assert starts == sorted(set(starts))
    assert _ms(body["meta"]["end"]) == end
    # Each bucket after the first starts on a local whole hour / midnight / first of month.
    for ts in stamps(body)[1:]:
        local = datetime.fromisoformat(ts)
        assert (local.minute, local.second, local.microsecond) == (0, 0, 0)
        if scenario["granularity"] != "hour":
            assert local.hour == 0
        if scenario["granularity"] == "month":
            assert local.day == 1

    # A naive count: each event in the bucket whose [ts, next ts) holds it.
    bounds = [*starts, end]
    want_counts = [0] * len(starts)
    want_seconds = [0.0] * len(starts)
    for ms, value, _, _ in scenario["events"]:
        if start <= ms < end:
            i = bisect_right(bounds, ms) - 1
            want_counts[i] += 1
            want_seconds[i] += value
    assert counts(body) == want_counts
    assert seconds(body) == pytest.approx(want_seconds)
    assert sum(counts(body)) == sum(start <= e[0] < end for e in scenario["events"])

    # A limit keeps the earliest buckets, unchanged.
    limited = ok(client, account, operator_secret, limit=str(scenario["limit"]), **params)
    assert limited["data"] == body["data"][: scenario["limit"]]
    assert limited["meta"] == body["meta"]

    # Grouped, the groups of a bucket add up to the same numbers.
    grouped = ok(client, account, operator_secret, group_by="subaccount,agent,type", **params)
    assert stamps(grouped) == stamps(body)
    assert counts(grouped) == want_counts
    for b in grouped["data"]:
        for v in b["values"]:
            assert v["conversations"] > 0
            assert set(v["dimensions"]) == {"subaccount", "agent", "type"}
            assert v["dimensions"]["subaccount"] in (account, sub)
