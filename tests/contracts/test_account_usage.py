"""GET /v1/account/usage/ over the real app and a real SQLite file."""

from __future__ import annotations

import logging
import re
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Clock, Tenants, event

PATH = "/v1/account/usage/"
TRACE = re.compile(r"[0-9a-f]{32}")


def key(tenants: Tenants, account: str) -> dict[str, str]:
    return {"X-Api-Key": tenants.secrets[account]}


def get(client: TestClient, headers: dict[str, str], path: str = PATH, **params: str) -> Any:
    return client.get(path, headers=headers, params=params, follow_redirects=False)


def ok(client: TestClient, headers: dict[str, str], **params: str) -> dict[str, Any]:
    response = get(client, headers, **params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["total_requests_in_timeperiod"] == sum(
        u["request_count"] for u in body["usage_data"]
    )
    return body


def request(account: str, ts: str, **fields: Any) -> Any:
    return event(uuid.uuid4().hex, account, "requests", ts, **fields)


def daily(body: dict[str, Any]) -> list[tuple[str, int]]:
    return [(u["date"], u["request_count"]) for u in body["usage_data"]]


def error(response: Any, status: int, field: str | None) -> dict[str, Any]:
    """The error envelope, checked whole; returns its ``error`` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "wp_trace_id"}
    assert TRACE.fullmatch(body["wp_trace_id"])
    err: dict[str, Any] = body["error"]
    assert set(err) == {"code", "message", "long_message", "meta"}
    assert err["code"] == status
    assert err["message"] == {400: "Bad Request", 404: "Not Found"}[status]
    assert err["long_message"]
    if field is None:
        assert err["meta"] is None
    else:
        assert set(err["meta"]) == {"field", "validation_error"}
        assert err["meta"]["field"] == field
        assert err["meta"]["validation_error"]
    return err


# --------------------------------------------------------------------- range


def test_dates_are_inclusive_utc_days(client: TestClient, tenants: Tenants, send: Any) -> None:
    send(
        request("other", "2025-03-01T23:59:59Z"),
        request("other", "2025-03-02T00:00:00Z"),
        request("other", "2025-03-04T12:00:00Z"),
        request("other", "2025-03-04T13:00:00Z"),
        request("other", "2025-03-06T23:59:59.999Z"),
        request("other", "2025-03-07T00:00:00Z"),
    )
    body = ok(client, key(tenants, "other"), start_date="2025-03-02", end_date="2025-03-06")
    assert body == {
        "time_range": {"start_date": "2025-03-02", "end_date": "2025-03-06"},
        "usage_data": [
            {"date": "2025-03-02", "request_count": 1},
            {"date": "2025-03-03", "request_count": 0},
            {"date": "2025-03-04", "request_count": 2},
            {"date": "2025-03-05", "request_count": 0},
            {"date": "2025-03-06", "request_count": 1},
        ],
        "total_requests_in_timeperiod": 4,
    }


def test_one_day(client: TestClient, tenants: Tenants, send: Any) -> None:
    send(request("other", "2025-03-04T00:00:00Z"), request("other", "2025-03-05T00:00:00Z"))
    body = ok(client, key(tenants, "other"), start_date="2025-03-04", end_date="2025-03-04")
    assert daily(body) == [("2025-03-04", 1)]


def test_usage_data_starts_at_the_first_day_with_usage(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(request("other", "2025-03-05T08:00:00Z"), request("other", "2025-03-07T08:00:00Z"))
    body = ok(client, key(tenants, "other"), start_date="2025-03-01", end_date="2025-03-09")
    assert daily(body) == [
        ("2025-03-05", 1),
        ("2025-03-06", 0),
        ("2025-03-07", 1),
        ("2025-03-08", 0),
        ("2025-03-09", 0),
    ]
    assert body["time_range"] == {"start_date": "2025-03-01", "end_date": "2025-03-09"}


def test_no_usage_is_an_empty_list(client: TestClient, tenants: Tenants, send: Any) -> None:
    send(request("other", "2025-02-27T08:00:00Z"))  # before the range
    body = ok(client, key(tenants, "other"), start_date="2025-03-01", end_date="2025-03-09")
    assert body == {
        "time_range": {"start_date": "2025-03-01", "end_date": "2025-03-09"},
        "usage_data": [],
        "total_requests_in_timeperiod": 0,
    }


def test_90_days_counting_both_ends_is_the_limit(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(request("other", "2025-01-01T00:00:00Z"), request("other", "2025-03-31T00:00:00Z"))
    # The clock reads 2025-03-15: the days after it are not listed, the range is still valid.
    body = ok(client, key(tenants, "other"), start_date="2025-01-01", end_date="2025-03-31")
    assert len(body["usage_data"]) == 31 + 28 + 15
    assert body["total_requests_in_timeperiod"] == 1
    response = get(client, key(tenants, "other"), start_date="2025-01-01", end_date="2025-04-01")
    err = error(response, 400, "end_date")
    assert "91 days" in err["long_message"]
    assert "2025-03-31" in err["long_message"]  # the furthest end_date allowed


def test_today_is_listed_and_counts_at_once(
    client: TestClient, clock: Clock, tenants: Tenants, send: Any
) -> None:
    # The clock reads 2025-03-15 12:00 UTC. An event of a minute ago is counted at once.
    send(request("other", "2025-03-15T11:59:00Z"))
    body = ok(client, key(tenants, "other"), start_date="2025-03-15", end_date="2025-03-15")
    assert daily(body) == [("2025-03-15", 1)]
    send(request("other", "2025-03-15T12:00:00Z"))
    body = ok(client, key(tenants, "other"), start_date="2025-03-15", end_date="2025-03-15")
    assert daily(body) == [("2025-03-15", 2)]


def test_days_after_today_are_not_listed(
    client: TestClient, clock: Clock, tenants: Tenants, send: Any
) -> None:
    send(
        request("other", "2025-03-13T10:00:00Z"),
        request("other", "2025-03-15T23:59:59Z"),  # later today: counted
        request("other", "2025-03-16T00:00:00Z"),  # tomorrow: not listed, not counted
    )
    body = ok(client, key(tenants, "other"), start_date="2025-03-10", end_date="2025-03-20")
    assert daily(body) == [("2025-03-13", 1), ("2025-03-14", 0), ("2025-03-15", 1)]
    assert body["time_range"] == {"start_date": "2025-03-10", "end_date": "2025-03-20"}
    body = ok(client, key(tenants, "other"), start_date="2025-03-16", end_date="2025-03-20")
    assert body["usage_data"] == []
    assert body["total_requests_in_timeperiod"] == 0
    clock.at = datetime(2025, 3, 16, 0, 0, tzinfo=UTC)  # midnight: the 16th is today
    body = ok(client, key(tenants, "other"), start_date="2025-03-10", end_date="2025-03-20")
    assert daily(body)[-2:] == [("2025-03-15", 1), ("2025-03-16", 1)]


def test_every_request_counts_whatever_its_status(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    ts = "2025-03-04T00:00:00Z"
    send(
        request("other", ts, dimensions={"status": "200"}),
        request("other", ts, dimensions={"status": "201"}),
        request("other", ts, dimensions={"status": "404"}),
        request("other", ts, dimensions={"status": "429"}),
        request("other", ts, dimensions={"status": "500"}),
        request("other", ts, dimensions={"status": "503"}, billable=False),
        request("other", ts, billable=False),
        request("other", ts),
        event("x1", "other", "lookups", ts),  # another metric
        event("x2", "other", "actions", ts),
    )
    body = ok(client, key(tenants, "other"), start_date="2025-03-04", end_date="2025-03-04")
    assert daily(body) == [("2025-03-04", 8)]


def test_a_retried_event_counts_once(client: TestClient, tenants: Tenants, send: Any) -> None:
    once = event("r1", "other", "requests", "2025-03-04T00:00:00Z")
    send(once)
    send(once)
    body = ok(client, key(tenants, "other"), start_date="2025-03-04", end_date="2025-03-04")
    assert body["total_requests_in_timeperiod"] == 1


def test_with_and_without_the_trailing_slash(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(request("other", "2025-03-04T00:00:00Z"))
    params = {"start_date": "2025-03-01", "end_date": "2025-03-05"}
    slash = get(client, key(tenants, "other"), PATH, **params)
    bare = get(client, key(tenants, "other"), PATH.rstrip("/"), **params)
    assert slash.status_code == bare.status_code == 200
    assert slash.json() == bare.json()
    assert bare.json()["total_requests_in_timeperiod"] == 1
    assert get(client, {}, PATH.rstrip("/"), **params).json() == {"message": "Forbidden"}


# ------------------------------------------------------------------- tenancy


def test_an_account_sees_its_subaccounts(client: TestClient, tenants: Tenants, send: Any) -> None:
    ts = "2025-03-04T00:00:00Z"
    send(
        request("root", ts),
        request("child", ts),
        request("grandchild", ts),
        request("grandchild", ts),
        request("sibling", ts),
        request("other", ts),
    )
    params = {"start_date": "2025-03-04", "end_date": "2025-03-04"}

    def total(caller: str, **extra: str) -> int:
        n: int = ok(client, key(tenants, caller), **params, **extra)["total_requests_in_timeperiod"]
        return n

    assert total("root") == 5
    assert total("child") == 3
    assert total("grandchild") == 2
    assert total("sibling") == 1
    assert total("other") == 1
    assert total("root", account="child") == 3
    assert total("child", account="grandchild") == 2


def test_operator_names_the_account(
    client: TestClient, tenants: Tenants, op: dict[str, str], send: Any
) -> None:
    send(request("child", "2025-03-04T00:00:00Z"))
    headers = {"X-Api-Key": op["Authorization"].removeprefix("Bearer ")}
    params = {"start_date": "2025-03-04", "end_date": "2025-03-04"}
    body = ok(client, headers, account="child", **params)
    assert body["total_requests_in_timeperiod"] == 1
    err = error(get(client, headers, **params), 400, "account")
    assert "account=" in err["long_message"]
    err = error(get(client, headers, account="nope", **params), 404, None)
    assert "'nope'" in err["long_message"]


@pytest.mark.parametrize(
    ("caller", "account"),
    [("child", "root"), ("child", "sibling"), ("grandchild", "child"), ("root", "other")],
)
def test_an_account_key_may_not_read_above_or_beside_it(
    client: TestClient, tenants: Tenants, caller: str, account: str
) -> None:
    response = get(
        client,
        key(tenants, caller),
        start_date="2025-03-04",
        end_date="2025-03-04",
        account=account,
    )
    error(response, 404, None)


# ---------------------------------------------------------------------- 403


def test_missing_or_invalid_key_is_403_forbidden(
    client: TestClient, tenants: Tenants, op: dict[str, str]
) -> None:
    params = {"start_date": "2025-03-04", "end_date": "2025-03-04"}
    secret = tenants.secrets["other"]
    for headers in (
        {},
        {"X-Api-Key": ""},
        {"X-Api-Key": "nope"},
        {"X-Api-Key": secret + "x"},
        {"Authorization": f"Bearer {secret}"},  # this contract reads X-Api-Key only
    ):
        response = get(client, headers, **params)
        assert response.status_code == 403
        assert response.content == b'{"message":"Forbidden"}'
    # The key is checked first: bad parameters and a bad key are a 403.
    response = get(client, {}, start_date="nope")
    assert (response.status_code, response.json()) == (403, {"message": "Forbidden"})
    assert client.delete("/v1/keys/key_other", headers=op).status_code == 200
    response = get(client, {"X-Api-Key": secret}, **params)
    assert (response.status_code, response.json()) == (403, {"message": "Forbidden"})


def test_key_without_read_scope_is_403(
    client: TestClient, tenants: Tenants, op: dict[str, str]
) -> None:
    created = client.post("/v1/accounts/other/keys", json={"scopes": ["ingest"]}, headers=op)
    assert created.status_code == 201, created.text
    response = get(
        client, {"X-Api-Key": created.json()["key"]}, start_date="2025-03-04", end_date="2025-03-04"
    )
    assert (response.status_code, response.json()) == (403, {"message": "Forbidden"})


# ---------------------------------------------------------------------- 400


@pytest.mark.parametrize(
    ("params", "field", "validation_error"),
    [
        ({"end_date": "2025-03-04"}, "start_date", "required"),
        ({"start_date": "", "end_date": "2025-03-04"}, "start_date", "required"),
        ({"start_date": "2025-03-04"}, "end_date", "required"),
        (
            {"start_date": "2025/03/04", "end_date": "2025-03-04"},
            "start_date",
            "invalid date format",
        ),
        ({"start_date": "2025-3-4", "end_date": "2025-03-04"}, "start_date", "invalid date format"),
        ({"start_date": "20250304", "end_date": "2025-03-04"}, "start_date", "invalid date format"),
        (
            {"start_date": " 2025-03-04", "end_date": "2025-03-04"},
            "start_date",
            "invalid date format",
        ),
        (
            {"start_date": "2025-03-04", "end_date": "2025-03-04T00:00:00Z"},
            "end_date",
            "invalid date format",
        ),
        ({"start_date": "2025-03-04", "end_date": "tomorrow"}, "end_date", "invalid date format"),
        (
            {"start_date": "2025-02-30", "end_date": "2025-03-04"},
            "start_date",
            "not a calendar date",
        ),
        ({"start_date": "2025-03-04", "end_date": "2025-13-01"}, "end_date", "not a calendar date"),
        (
            {"start_date": "0000-01-01", "end_date": "2025-03-04"},
            "start_date",
            "not a calendar date",
        ),
        ({"start_date": "2025-03-05", "end_date": "2025-03-04"}, "start_date", "after end_date"),
        (
            {"start_date": "2024-12-01", "end_date": "2025-03-01"},
            "end_date",
            "range longer than 90 days",
        ),
    ],
)
def test_each_bad_request_names_its_field(
    client: TestClient,
    tenants: Tenants,
    caplog: pytest.LogCaptureFixture,
    params: dict[str, str],
    field: str,
    validation_error: str,
) -> None:
    with caplog.at_level(logging.WARNING, logger="usagemeter"):
        response = get(client, key(tenants, "other"), **params)
    err = error(response, 400, field)
    assert err["meta"]["validation_error"] == validation_error
    assert field in err["long_message"]
    # The server logs the same trace id, with the field and the message.
    trace_id = response.json()["wp_trace_id"]
    [record] = [r for r in caplog.records if trace_id in r.getMessage()]
    assert record.name == "usagemeter"
    assert record.levelno == logging.WARNING
    assert f"field={field}" in record.getMessage()
    assert err["long_message"] in record.getMessage()


def test_every_problem_is_in_the_long_message(client: TestClient, op: dict[str, str]) -> None:
    headers = {"X-Api-Key": op["Authorization"].removeprefix("Bearer ")}
    err = error(get(client, headers, end_date="March"), 400, "start_date")
    for part in ("start_date", "end_date", "account"):
        assert part in err["long_message"]


def test_trace_ids_differ_and_404_is_logged(
    client: TestClient, tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="usagemeter"):
        first = get(
            client,
            key(tenants, "child"),
            account="root",
            start_date="2025-03-04",
            end_date="2025-03-04",
        )
        second = get(
            client,
            key(tenants, "child"),
            account="root",
            start_date="2025-03-04",
            end_date="2025-03-04",
        )
    error(first, 404, None)
    ids = {first.json()["wp_trace_id"], second.json()["wp_trace_id"]}
    assert len(ids) == 2
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "usagemeter")
    assert all(i in logged for i in ids)


def test_unknown_parameters_are_ignored_and_dates_far_back_work(
    client: TestClient, tenants: Tenants
) -> None:
    body = ok(
        client, key(tenants, "other"), start_date="0001-01-01", end_date="0001-03-31", foo="bar"
    )
    assert body["usage_data"] == []


# ------------------------------------------------------------------- openapi


def test_endpoint_is_in_the_openapi_document(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    operation = document["paths"][PATH]["get"]
    names = {p["name"] for p in operation["parameters"]}
    assert {"start_date", "end_date", "account"} <= names
    assert {"200", "400", "403", "404"} <= set(operation["responses"])
    [scheme] = operation["security"][0]
    assert document["components"]["securitySchemes"][scheme]["name"].lower() == "x-api-key"


# ---------------------------------------------------------------- properties

TODAY = date(2025, 3, 15)  # the clock's default


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    offsets=st.lists(st.integers(min_value=-40 * 86400, max_value=5 * 86400), max_size=30),
    start=st.integers(min_value=-45, max_value=6),
    length=st.integers(min_value=1, max_value=90),
)
def test_matches_a_naive_count(
    client: TestClient, op: dict[str, str], send: Any, offsets: list[int], start: int, length: int
) -> None:
    account_id = "acct-" + uuid.uuid4().hex[:12]
    created = client.post("/v1/accounts", json={"id": account_id, "name": "p"}, headers=op)
    assert created.status_code == 201
    midnight = datetime.combine(TODAY, datetime.min.time(), UTC)
    stamps = [midnight + timedelta(seconds=s) for s in offsets]
    if stamps:
        send(*(request(account_id, t.isoformat()) for t in stamps))
    first = TODAY + timedelta(days=start)
    last = first + timedelta(days=length - 1)
    headers = {"X-Api-Key": op["Authorization"].removeprefix("Bearer ")}
    body = ok(client, headers, account=account_id, start_date=str(first), end_date=str(last))

    shown = min(last, TODAY)
    counted = [t.date() for t in stamps if first <= t.date() <= shown]
    assert body["total_requests_in_timeperiod"] == len(counted)
    if not counted:
        assert body["usage_data"] == []
        return
    begin = min(counted)
    want = [
        (str(begin + timedelta(days=i)), counted.count(begin + timedelta(days=i)))
        for i in range((shown - begin).days + 1)
    ]
    assert daily(body) == want
