"""GET /v1/usage over the real app and a real SQLite file."""

from __future__ import annotations

import itertools
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Clock, Tenants, event
from usagemeter.auth import issue_key
from usagemeter.model import Account, Scope
from usagemeter.store.sqlite import SQLiteStore

PATH = "/v1/usage"
METRICS = ["ApiCalls", "Events", "Sessions", "StorageBytes", "BotAnalyses"]


def get(client: TestClient, headers: dict[str, str], **params: str) -> Any:
    return client.get(PATH, headers=headers, params=params)


def ok(client: TestClient, headers: dict[str, str], **params: str) -> dict[str, Any]:
    response = get(client, headers, **params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"startDate", "endDate", "data", "totals"}
    for entry in body["data"]:
        assert isinstance(entry["value"], int)
    # Ordered by period, then by the seed's metric order; one entry per day and metric.
    keys = [(e["period"], METRICS.index(e["metricType"])) for e in body["data"]]
    assert keys == sorted(set(keys))
    return body


def error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    found: dict[str, Any] = body["error"]
    return found


def use(account: str, metric: str, ts: str | int, **fields: Any) -> dict[str, Any]:
    return event(uuid.uuid4().hex, account, metric, ts, **fields)


def values(body: dict[str, Any], metric: str) -> dict[str, int]:
    return {e["period"]: e["value"] for e in body["data"] if e["metricType"] == metric}


# ------------------------------------------------------------------ range


def test_defaults_are_today_and_the_30_days_before(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    # The clock reads 2025-03-15 12:00 UTC: [2025-02-13 00:00, 2025-03-16 00:00).
    send(
        use("root", "ApiCalls", "2025-02-12T23:59:59.999Z"),
        use("root", "ApiCalls", "2025-02-13T00:00:00Z", value=2),
        use("root", "ApiCalls", "2025-03-15T23:59:59.999Z", value=3),  # later today: counted
        use("root", "ApiCalls", "2025-03-16T00:00:00Z"),
    )
    body = ok(client, tenants.headers("root"))
    assert body["startDate"] == "2025-02-13"
    assert body["endDate"] == "2025-03-15"
    assert values(body, "ApiCalls") == {"2025-02-13": 2, "2025-03-15": 3}
    assert body["totals"] == {**dict.fromkeys(METRICS, 0), "ApiCalls": 5}
    assert list(body["totals"]) == METRICS


def test_defaults_follow_the_pinned_clock(
    client: TestClient, tenants: Tenants, clock: Clock
) -> None:
    clock.at = datetime(2024, 3, 1, 0, 30, tzinfo=UTC)
    body = ok(client, tenants.headers("root"))
    assert (body["startDate"], body["endDate"]) == ("2024-01-31", "2024-03-01")


def test_start_defaults_to_30_days_before_the_end_given(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(
        use("root", "Events", "2024-12-01T00:00:00Z"),
        use("root", "Events", "2024-11-30T23:59:59.999Z"),
    )
    body = ok(client, tenants.headers("root"), endDate="2024-12-31")
    assert (body["startDate"], body["endDate"]) == ("2024-12-01", "2024-12-31")
    assert body["totals"]["Events"] == 1
    # A date-time end: the instant 30 days earlier.
    body = ok(client, tenants.headers("root"), endDate="2024-12-31T06:00:00Z")
    assert (body["startDate"], body["endDate"]) == ("2024-12-01", "2024-12-31")
    assert body["totals"]["Events"] == 0  # 2024-12-01T00:00 is before 06:00 that day


def test_date_bounds_are_whole_inclusive_utc_days(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(
        use("root", "BotAnalyses", "2025-02-28T23:59:59.999Z", value=100),
        use("root", "BotAnalyses", "2025-03-01T00:00:00Z", value=1),
        use("root", "BotAnalyses", "2025-03-03T23:59:59.999Z", value=2),
        use("root", "BotAnalyses", "2025-03-04T00:00:00Z", value=100),
    )
    body = ok(client, tenants.headers("root"), startDate="2025-03-01", endDate="2025-03-03")
    assert (body["startDate"], body["endDate"]) == ("2025-03-01", "2025-03-03")
    assert values(body, "BotAnalyses") == {"2025-03-01": 1, "2025-03-03": 2}
    assert body["totals"]["BotAnalyses"] == 3
    # One day: startDate == endDate.
    body = ok(client, tenants.headers("root"), startDate="2025-03-03", endDate="2025-03-03")
    assert body["totals"]["BotAnalyses"] == 2


def test_date_time_bounds_are_inclusive_to_the_millisecond(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(
        use("root", "ApiCalls", "2025-03-01T09:59:59.999Z", value=100),
        use("root", "ApiCalls", "2025-03-01T10:00:00.000Z", value=1),
        use("root", "ApiCalls", "2025-03-02T12:00:00.000Z", value=2),
        use("root", "ApiCalls", "2025-03-02T12:00:00.001Z", value=100),
    )
    headers = tenants.headers("root")
    body = ok(client, headers, startDate="2025-03-01T10:00:00Z", endDate="2025-03-02T12:00:00Z")
    assert (body["startDate"], body["endDate"]) == ("2025-03-01", "2025-03-02")
    assert values(body, "ApiCalls") == {"2025-03-01": 1, "2025-03-02": 2}
    assert body["totals"]["ApiCalls"] == 3
    # With offsets ('+' sent as %2B), and without one (UTC).
    body = ok(
        client,
        headers,
        startDate="2025-03-01T12:00:00+02:00",
        endDate="2025-03-02T07:00:00-05:00",
    )
    assert body["totals"]["ApiCalls"] == 3
    body = ok(client, headers, startDate="2025-03-01T10:00:00.001", endDate="2025-03-02T12:00")
    assert body["totals"]["ApiCalls"] == 2
    # A date and a date-time together.
    body = ok(client, headers, startDate="2025-03-01", endDate="2025-03-02T12:00:00.000Z")
    assert body["totals"]["ApiCalls"] == 103
    # A single millisecond.
    one = "2025-03-02T12:00:00.001Z"
    assert ok(client, headers, startDate=one, endDate=one)["totals"]["ApiCalls"] == 100


def test_a_range_of_366_days_is_allowed_and_367_is_not(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(use("root", "Events", "2024-01-01T00:00:00Z"), use("root", "Events", "2024-12-31T23:00Z"))
    headers = tenants.headers("root")
    body = ok(client, headers, startDate="2024-01-01", endDate="2024-12-31")  # leap year: 366
    assert body["totals"]["Events"] == 2
    response = get(client, headers, startDate="2024-01-01", endDate="2025-01-01")
    found = error(response, 400, "range_too_long")
    assert "367 days" in found["message"]
    # Date-times: 366 x 24 hours, both ends counted.
    ok(client, headers, startDate="2024-01-01T00:00:00Z", endDate="2024-12-31T23:59:59.999Z")
    error(
        get(client, headers, startDate="2024-01-01T00:00:00Z", endDate="2025-01-01T00:00:00Z"),
        400,
        "range_too_long",
    )


# ------------------------------------------------------------ aggregations


def test_sum_metrics_add_values_and_round_to_integers(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(
        use("root", "ApiCalls", "2025-03-10T01:00:00Z", value=2),
        use("root", "ApiCalls", "2025-03-10T02:00:00Z", value=3),
        use("root", "ApiCalls", "2025-03-11T02:00:00Z", value=1.4),
        use("root", "Events", "2025-03-10T02:00:00Z", value=7),
        use("root", "BotAnalyses", "2025-03-11T02:00:00Z"),
        use("root", "BotAnalyses", "2025-03-11T03:00:00Z", billable=False),  # counted too
        use("root", "Other", "2025-03-11T03:00:00Z"),  # not a metric of this endpoint
    )
    body = ok(client, tenants.headers("root"), startDate="2025-03-10", endDate="2025-03-11")
    assert body["data"] == [
        {"period": "2025-03-10", "metricType": "ApiCalls", "value": 5},
        {"period": "2025-03-10", "metricType": "Events", "value": 7},
        {"period": "2025-03-11", "metricType": "ApiCalls", "value": 1},
        {"period": "2025-03-11", "metricType": "BotAnalyses", "value": 2},
    ]
    expected = {"ApiCalls": 6, "Events": 7, "Sessions": 0, "StorageBytes": 0, "BotAnalyses": 2}
    assert body["totals"] == expected


def test_sessions_are_distinct_per_day_and_over_the_range(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    def session(ts: str, sid: str | None) -> dict[str, Any]:
        return use("root", "Sessions", ts, dimensions={"session_id": sid} if sid else {})

    send(
        session("2025-03-10T01:00:00Z", "s1"),
        session("2025-03-10T02:00:00Z", "s1"),
        session("2025-03-10T03:00:00Z", "s2"),
        session("2025-03-11T01:00:00Z", "s2"),
        session("2025-03-11T02:00:00Z", "s3"),
    )
    body = ok(client, tenants.headers("root"), startDate="2025-03-10", endDate="2025-03-11")
    assert values(body, "Sessions") == {"2025-03-10": 2, "2025-03-11": 2}
    # s1, s2, s3: three sessions over the range, not 2 + 2.
    assert body["totals"]["Sessions"] == 3


def test_storage_is_the_latest_value_going_up_and_down(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(
        use("root", "StorageBytes", "2025-03-10T01:00:00Z", value=100),
        use("root", "StorageBytes", "2025-03-10T05:00:00Z", value=300),
        use("root", "StorageBytes", "2025-03-10T03:00:00Z", value=900),  # sent late, older
        use("root", "StorageBytes", "2025-03-11T01:00:00Z", value=250),
        use("root", "StorageBytes", "2025-03-11T02:00:00Z", value=50),
        use("root", "StorageBytes", "2025-03-12T02:00:00Z", value=70),
    )
    headers = tenants.headers("root")
    body = ok(client, headers, startDate="2025-03-10", endDate="2025-03-12", metric="storagebytes")
    assert values(body, "StorageBytes") == {"2025-03-10": 300, "2025-03-11": 50, "2025-03-12": 70}
    assert body["totals"] == {"StorageBytes": 70}
    body = ok(client, headers, startDate="2025-03-10", endDate="2025-03-11", metric="StorageBytes")
    assert body["totals"] == {"StorageBytes": 50}  # went down: the latest, not the maximum
    body = ok(client, headers, startDate="2025-03-10", endDate="2025-03-10", metric="StorageBytes")
    assert body["totals"] == {"StorageBytes": 300}


def test_a_parent_sees_its_subaccounts_usage(
    client: TestClient, tenants: Tenants, op: dict[str, str], send: Any
) -> None:
    day = "2025-03-10T01:00:00Z"
    later = "2025-03-10T05:00:00Z"
    send(
        use("root", "ApiCalls", day, value=1),
        use("child", "ApiCalls", day, value=10),
        use("grandchild", "ApiCalls", day, value=100),
        use("other", "ApiCalls", day, value=1000),
        use("root", "Sessions", day, dimensions={"session_id": "shared"}),
        use("child", "Sessions", day, dimensions={"session_id": "shared"}),
        use("child", "Sessions", day, dimensions={"session_id": "c"}),
        use("root", "StorageBytes", day, value=5),
        use("child", "StorageBytes", day, value=20),
        use("child", "StorageBytes", later, value=30),
        use("grandchild", "StorageBytes", day, value=400),
    )
    params = {"startDate": "2025-03-10", "endDate": "2025-03-10"}
    root = ok(client, tenants.headers("root"), **params)["totals"]
    # Storage adds up each account's latest value: 5 + 30 + 400.
    assert (root["ApiCalls"], root["Sessions"], root["StorageBytes"]) == (111, 2, 435)
    child = ok(client, tenants.headers("child"), **params)["totals"]
    assert (child["ApiCalls"], child["Sessions"], child["StorageBytes"]) == (110, 2, 430)
    grandchild = ok(client, tenants.headers("grandchild"), **params)["totals"]
    assert (grandchild["ApiCalls"], grandchild["StorageBytes"]) == (100, 400)
    # A parent key may name a subaccount; an operator names any account.
    named = ok(client, tenants.headers("root"), account="child", **params)["totals"]
    assert named == child
    assert ok(client, op, account="child", **params)["totals"] == child
    assert ok(client, op, account="other", **params)["totals"]["ApiCalls"] == 1000


# ------------------------------------------------------------------ metric


@pytest.mark.parametrize(
    ("given_", "canonical"),
    [
        ("ApiCalls", "ApiCalls"),
        ("apicalls", "ApiCalls"),
        ("APICALLS", "ApiCalls"),
        ("events", "Events"),
        ("sEsSiOnS", "Sessions"),
        ("storagebytes", "StorageBytes"),
        (" BotAnalyses ", "BotAnalyses"),
    ],
)
def test_metric_is_case_insensitive(
    client: TestClient, tenants: Tenants, send: Any, given_: str, canonical: str
) -> None:
    ts = "2025-03-14T10:00:00Z"
    send(*(use("root", m, ts, dimensions={"session_id": "s"}) for m in METRICS))
    body = ok(client, tenants.headers("root"), metric=given_)
    assert body["data"] == [{"period": "2025-03-14", "metricType": canonical, "value": 1}]
    assert body["totals"] == {canonical: 1}


def test_data_is_ordered_by_period_then_metric(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    events = [
        use("root", m, f"2025-03-{d:02d}T10:00:00Z", dimensions={"session_id": "s"})
        for d in (12, 10, 11)
        for m in reversed(METRICS)
    ]
    send(*events)
    body = ok(client, tenants.headers("root"), startDate="2025-03-10", endDate="2025-03-12")
    assert [(e["period"], e["metricType"]) for e in body["data"]] == [
        (f"2025-03-{d}", m) for d in (10, 11, 12) for m in METRICS
    ]


def test_no_usage_still_lists_every_total(client: TestClient, tenants: Tenants) -> None:
    body = ok(client, tenants.headers("other"))
    assert body["data"] == []
    assert body["totals"] == dict.fromkeys(METRICS, 0)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer aik_v1_not_a_key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
def test_missing_or_invalid_key_is_401(
    client: TestClient, tenants: Tenants, headers: dict[str, str]
) -> None:
    found = error(get(client, headers), 401, "unauthorized")
    assert "Authorization: Bearer" in found["message"]


def test_a_revoked_key_is_401(client: TestClient, tenants: Tenants, store: SQLiteStore) -> None:
    store.revoke_key("key_root")
    error(get(client, tenants.headers("root")), 401, "unauthorized")


def test_401_comes_before_parameter_errors(client: TestClient) -> None:
    error(get(client, {}, metric="nope"), 401, "unauthorized")


def test_an_unknown_metric_lists_the_allowed_ones(client: TestClient, tenants: Tenants) -> None:
    found = error(get(client, tenants.headers("root"), metric="Calls"), 400, "invalid_metric")
    assert all(m in found["message"] for m in METRICS)
    assert found["details"]["allowed"] == METRICS
    error(get(client, tenants.headers("root"), metric=""), 400, "invalid_metric")


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2025-13-01",
        "2025-02-30",
        "20250301",  # ISO basic format: not accepted
        "1741000000000",  # epoch milliseconds: not ISO 8601
        "2025-03-01T25:00:00Z",
        "2025-03-01T10:00:00 02:00",  # a '+' that the URL turned into a space
        "1969-12-31",
        "2200-01-01",
        "",
    ],
)
def test_a_bad_date_is_400(client: TestClient, tenants: Tenants, value: str) -> None:
    for param in ("startDate", "endDate"):
        found = error(get(client, tenants.headers("root"), **{param: value}), 400, "invalid_date")
        assert found["message"].startswith(f"{param}: ")
        assert found["details"]["errors"][0]["param"] == param
        assert "epoch" not in found["message"]


def test_the_plus_hint(client: TestClient, tenants: Tenants) -> None:
    found = error(
        get(client, tenants.headers("root"), startDate="2025-03-01T10:00:00 02:00"),
        400,
        "invalid_date",
    )
    assert "%2B" in found["message"]


def test_start_after_end_is_400(client: TestClient, tenants: Tenants) -> None:
    headers = tenants.headers("root")
    found = error(
        get(client, headers, startDate="2025-03-02", endDate="2025-03-01"), 400, "invalid_range"
    )
    assert "startDate must not be after endDate" in found["message"]
    error(
        get(client, headers, startDate="2025-03-01T10:00:00.001Z", endDate="2025-03-01T10:00Z"),
        400,
        "invalid_range",
    )
    # The default end is today: a start in the future is after it.
    found = error(get(client, headers, startDate="2025-03-16"), 400, "invalid_range")
    assert "defaults to today" in found["message"]


def test_every_problem_is_reported_at_once(client: TestClient, op: dict[str, str]) -> None:
    found = error(
        get(client, op, metric="nope", startDate="soon", endDate="2025-02-30"),
        400,
        "invalid_parameters",
    )
    params = [e["param"] for e in found["details"]["errors"]]
    assert params == ["metric", "startDate", "endDate", "account"]
    assert found["details"]["allowed"] == METRICS


def test_an_operator_must_name_the_account(client: TestClient, op: dict[str, str]) -> None:
    found = error(get(client, op), 400, "account_required")
    assert "?account=" in found["message"]


@pytest.mark.parametrize(
    ("caller", "account"),
    [("child", "root"), ("child", "sibling"), ("grandchild", "child"), ("root", "other")],
)
def test_an_account_the_key_may_not_read_is_not_found(
    client: TestClient, tenants: Tenants, caller: str, account: str
) -> None:
    hidden = error(get(client, tenants.headers(caller), account=account), 404, "not_found")
    missing = error(get(client, tenants.headers(caller), account="nope"), 404, "not_found")
    # The same answer as for an account that does not exist, but for the name asked about.
    assert hidden["message"].replace(account, "nope") == missing["message"]


def test_an_operator_naming_a_missing_account_is_not_found(
    client: TestClient, op: dict[str, str], tenants: Tenants
) -> None:
    error(get(client, op, account="nope"), 404, "not_found")


def test_a_key_without_read_scope_is_forbidden(
    client: TestClient, tenants: Tenants, store: SQLiteStore
) -> None:
    _, secret = issue_key(store, "root", name="ingest only", scopes=[Scope.INGEST])
    error(get(client, {"Authorization": f"Bearer {secret}"}), 403, "forbidden")


def test_the_endpoint_is_in_the_openapi_document(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/usage"]["get"]
    names = {p["name"] for p in operation["parameters"]}
    assert {"startDate", "endDate", "metric", "account"} <= names
    assert {"200", "400", "401", "404"} <= set(operation["responses"])
    example = operation["responses"]["400"]["content"]["application/json"]["example"]
    assert set(example["error"]) == {"code", "message", "details"}


# --------------------------------------------------------------- property

BASE = datetime(2025, 3, 1, tzinfo=UTC)
SPAN_MS = 5 * 24 * 60 * 60 * 1000
_accounts = itertools.count()

usage_strategy = st.lists(
    st.tuples(
        st.sampled_from(METRICS),
        st.integers(0, SPAN_MS - 1),  # offset from BASE in ms
        st.integers(0, 1000),  # value
        st.sampled_from(["s1", "s2", "s3", "s4"]),  # session_id
        st.booleans(),  # in the subaccount
    ),
    max_size=30,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(usage=usage_strategy, first=st.integers(0, 4), length=st.integers(0, 4))
def test_entries_and_totals_match_a_naive_fold(
    client: TestClient,
    store: SQLiteStore,
    send: Any,
    usage: list[tuple[str, int, int, str, bool]],
    first: int,
    length: int,
) -> None:
    # A fresh parent and child per example, so examples never see each other's events.
    n = next(_accounts)
    parent, child = f"p{n}", f"c{n}"
    store.create_account(Account(parent, parent))
    store.create_account(Account(child, child, parent))
    _, secret = issue_key(store, parent, name=parent)
    # Distinct instants per account and metric, so "the latest" is never a tie.
    seen: set[tuple[str, str, int]] = set()
    rows = []
    for metric, offset, value, sid, sub in usage:
        account = child if sub else parent
        if (account, metric, offset) not in seen:
            seen.add((account, metric, offset))
            rows.append((metric, offset, value, sid, account))
    if rows:
        send(
            *(
                use(a, m, int(BASE.timestamp() * 1000) + o, value=v, dimensions={"session_id": s})
                for m, o, v, s, a in rows
            )
        )
    start = BASE.date() + timedelta(days=first)
    end = start + timedelta(days=length)
    body = ok(
        client,
        {"Authorization": f"Bearer {secret}"},
        startDate=start.isoformat(),
        endDate=end.isoformat(),
    )

    def day_of(offset: int) -> date:
        return (BASE + timedelta(milliseconds=offset)).date()

    inside = [r for r in rows if start <= day_of(r[1]) <= end]
    expected_days: dict[tuple[str, str], int] = {}
    expected_totals = dict.fromkeys(METRICS, 0)
    by_day: dict[tuple[str, date], list[tuple[str, int, int, str, str]]] = defaultdict(list)
    for row in inside:
        by_day[(row[0], day_of(row[1]))].append(row)
    for (metric, day), members in by_day.items():
        expected_days[(day.isoformat(), metric)] = fold(metric, members)
    for metric in METRICS:
        expected_totals[metric] = fold(metric, [r for r in inside if r[0] == metric])
    assert {(e["period"], e["metricType"]): e["value"] for e in body["data"]} == expected_days
    assert body["totals"] == expected_totals
    for metric in ("ApiCalls", "Events", "BotAnalyses"):
        # A sum's total is the sum of its days; distinct sessions are at most that.
        assert body["totals"][metric] == sum(values(body, metric).values())
    assert body["totals"]["Sessions"] <= sum(values(body, "Sessions").values())


def fold(metric: str, rows: list[tuple[str, int, int, str, str]]) -> int:
    if metric == "Sessions":
        return len({sid for _, _, _, sid, _ in rows})
    if metric == "StorageBytes":
        latest: dict[str, tuple[int, int]] = {}
        for _, offset, value, _, account in rows:
            if account not in latest or offset > latest[account][0]:
                latest[account] = (offset, value)
        return sum(value for _, value in latest.values())
    return sum(value for _, _, value, _, _ in rows)
