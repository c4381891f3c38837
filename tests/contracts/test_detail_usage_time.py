"""GET /analytics/detail-usage-time over the real app and a real SQLite file."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Clock, Tenants, event

PATH = "/analytics/detail-usage-time"
V = {"x-api-version": "2025-09"}


def get(client: TestClient, headers: dict[str, str], **params: str) -> Any:
    return client.get(PATH, headers={**V, **headers}, params=params)


def ok(client: TestClient, headers: dict[str, str], **params: str) -> dict[str, Any]:
    response = get(client, headers, **params)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    assert data["totalActions"] == sum(e["count"] for e in data["data"])
    return data


def action(account: str, ts: str, source: str | None = None, metric: str = "actions") -> Any:
    dims = {"source": source} if source is not None else {}
    return event(uuid.uuid4().hex, account, metric, ts, dimensions=dims)


def new_account(
    client: TestClient, op: dict[str, str], anchor: str | None = None, period: str = "month"
) -> str:
    account_id = "acct-" + uuid.uuid4().hex[:12]
    body: dict[str, Any] = {"id": account_id, "name": account_id}
    if anchor is not None:
        body["billing_cycle"] = {"anchor": anchor, "period": period}
    response = client.post("/v1/accounts", json=body, headers=op)
    assert response.status_code == 201, response.text
    return account_id


def days(data: dict[str, Any]) -> dict[str, int]:
    return {e["date"]: e["count"] for e in data["data"]}


# ------------------------------------------------------------------ periods


def test_7_days_includes_today_and_the_seven_days_before(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    # The clock reads 2025-03-15 12:00 UTC: the range is [03-08 00:00, 03-16 00:00).
    send(
        action("other", "2025-03-07T23:59:59Z"),
        action("other", "2025-03-08T00:00:00Z"),
        action("other", "2025-03-10T10:00:00Z", "app"),
        action("other", "2025-03-10T11:00:00Z", "app"),
        action("other", "2025-03-15T23:59:59Z", "api"),
        action("other", "2025-03-16T00:00:00Z"),
    )
    data = ok(client, tenants.headers("other"), timePeriod="7-days")
    assert (data["startDate"], data["endDate"], data["timePeriod"]) == (
        "2025-03-08",
        "2025-03-15",
        "7-days",
    )
    assert data["data"] == [
        {
            "appActions": 0,
            "month": "Mar-25",
            "year": 2025,
            "date": "2025-03-08",
            "apiActions": 1,
            "count": 1,
        },
        {
            "appActions": 2,
            "month": "Mar-25",
            "year": 2025,
            "date": "2025-03-10",
            "apiActions": 0,
            "count": 2,
        },
        {
            "appActions": 0,
            "month": "Mar-25",
            "year": 2025,
            "date": "2025-03-15",
            "apiActions": 1,
            "count": 1,
        },
    ]
    assert data["totalActions"] == 4


def test_30_days_is_daily_over_31_dates(client: TestClient, tenants: Tenants, send: Any) -> None:
    send(
        action("other", "2025-02-12T23:59:59Z"),
        action("other", "2025-02-13T00:00:00Z"),
        action("other", "2025-02-28T12:00:00Z"),
        action("other", "2025-03-15T08:00:00Z"),
    )
    data = ok(client, tenants.headers("other"), timePeriod="30-days")
    assert (data["startDate"], data["endDate"]) == ("2025-02-13", "2025-03-15")
    assert days(data) == {"2025-02-13": 1, "2025-02-28": 1, "2025-03-15": 1}
    assert [e["month"] for e in data["data"]] == ["Feb-25", "Feb-25", "Mar-25"]


def test_3_months_is_monthly_dated_by_the_first_day_with_usage(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(
        action("other", "2024-12-14T23:59:59Z", "app"),  # before the period
        action("other", "2024-12-15T00:00:00Z", "app"),
        action("other", "2025-01-09T05:00:00Z", "api"),
        action("other", "2025-01-03T05:00:00Z", "app"),
        action("other", "2025-01-31T23:00:00Z"),
        action("other", "2025-03-15T18:00:00Z", "app"),
    )
    data = ok(client, tenants.headers("other"), timePeriod="3-months")
    assert (data["startDate"], data["endDate"]) == ("2024-12-15", "2025-03-15")
    assert data["data"] == [
        {
            "appActions": 1,
            "month": "Dec-24",
            "year": 2024,
            "date": "2024-12-15",
            "apiActions": 0,
            "count": 1,
        },
        {
            "appActions": 1,
            "month": "Jan-25",
            "year": 2025,
            "date": "2025-01-03",
            "apiActions": 2,
            "count": 3,
        },
        {
            "appActions": 1,
            "month": "Mar-25",
            "year": 2025,
            "date": "2025-03-15",
            "apiActions": 0,
            "count": 1,
        },
    ]
    assert data["totalActions"] == 5


def test_3_months_is_calendar_months_clamped(
    client: TestClient, clock: Clock, tenants: Tenants
) -> None:
    clock.at = datetime(2025, 5, 31, 9, 0, tzinfo=UTC)
    data = ok(client, tenants.headers("other"), timePeriod="3-months")
    assert (data["startDate"], data["endDate"]) == ("2025-02-28", "2025-05-31")


def test_no_usage_is_an_empty_list_and_zero(client: TestClient, tenants: Tenants) -> None:
    for name in ("7-days", "30-days", "3-months", "current-billing-cycle"):
        data = ok(client, tenants.headers("other"), timePeriod=name)
        assert data["data"] == []
        assert data["totalActions"] == 0
        assert data["timePeriod"] == name


def test_other_metrics_are_not_actions(client: TestClient, tenants: Tenants, send: Any) -> None:
    send(
        action("other", "2025-03-10T00:00:00Z", "app", metric="requests"),
        action("other", "2025-03-10T00:00:00Z", "app", metric="lookups"),
        action("other", "2025-03-10T00:00:00Z", "app"),
    )
    assert days(ok(client, tenants.headers("other"), timePeriod="7-days")) == {"2025-03-10": 1}


# ------------------------------------------------------------ billing cycles


def test_default_is_the_current_billing_cycle_anchored_on_the_31st(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    # root's cycle is anchored on 2024-01-31, monthly. On 2025-03-15 the cycle began on
    # 2025-02-28 (February has no 31st) and the next begins 2025-03-31: [02-28, 03-31).
    send(
        action("root", "2025-02-27T23:59:59Z"),
        action("root", "2025-02-28T00:00:00Z", "app"),
        action("root", "2025-03-30T23:59:59Z", "api"),
        action("root", "2025-03-31T00:00:00Z"),
    )
    data = ok(client, tenants.headers("root"))
    assert data["timePeriod"] == "current-billing-cycle"
    assert (data["startDate"], data["endDate"]) == ("2025-02-28", "2025-03-31")
    assert days(data) == {"2025-02-28": 1, "2025-03-30": 1}  # 31 days: daily
    assert data == ok(client, tenants.headers("root"), timePeriod="current-billing-cycle")


@pytest.mark.parametrize(
    ("today", "start", "end"),
    [
        (date(2025, 3, 30), "2025-02-28", "2025-03-31"),
        (date(2025, 3, 31), "2025-03-31", "2025-04-30"),
        (date(2025, 4, 30), "2025-04-30", "2025-05-31"),
        (date(2024, 2, 29), "2024-02-29", "2024-03-31"),
        (date(2024, 2, 28), "2024-01-31", "2024-02-29"),
    ],
)
def test_cycle_anchored_on_the_31st_follows_month_ends(
    client: TestClient, clock: Clock, tenants: Tenants, today: date, start: str, end: str
) -> None:
    clock.at = datetime.combine(today, datetime.min.time(), UTC) + timedelta(hours=23)
    data = ok(client, tenants.headers("root"))
    assert (data["startDate"], data["endDate"]) == (start, end)


def test_today_on_the_anchor_day_starts_a_new_cycle(
    client: TestClient, clock: Clock, op: dict[str, str], send: Any
) -> None:
    account = new_account(client, op, anchor="2024-06-15")
    send(action(account, "2025-03-14T23:59:59Z"), action(account, "2025-03-15T00:00:00Z"))
    clock.at = datetime(2025, 3, 15, 0, 0, tzinfo=UTC)
    data = ok(client, op, account=account)
    assert (data["startDate"], data["endDate"]) == ("2025-03-15", "2025-04-15")
    assert days(data) == {"2025-03-15": 1}
    clock.at = datetime(2025, 3, 14, 23, 59, 59, tzinfo=UTC)
    data = ok(client, op, account=account)
    assert (data["startDate"], data["endDate"]) == ("2025-02-15", "2025-03-15")
    assert days(data) == {"2025-03-14": 1}


def test_yearly_cycle_is_monthly_as_in_the_seed(
    client: TestClient, clock: Clock, op: dict[str, str], send: Any
) -> None:
    account = new_account(client, op, anchor="2023-12-27", period="year")
    clock.at = datetime(2024, 11, 20, 12, 0, tzinfo=UTC)
    send(
        action(account, "2023-12-26T23:59:59Z", "app"),  # the previous cycle
        action(account, "2024-01-02T10:00:00Z", "app"),
        action(account, "2024-01-20T10:00:00Z", "app"),
        action(account, "2024-04-01T00:00:00Z", "app"),
        action(account, "2024-04-30T23:59:59Z", "api"),
        action(account, "2024-12-26T23:59:59Z", "app"),  # in the cycle, after today
        action(account, "2024-12-27T00:00:00Z", "app"),  # the next cycle
    )
    data = ok(client, op, account=account)
    assert (data["startDate"], data["endDate"]) == ("2023-12-27", "2024-12-27")
    assert [
        (e["month"], e["year"], e["date"], e["appActions"], e["apiActions"]) for e in data["data"]
    ] == [
        ("Jan-24", 2024, "2024-01-02", 2, 0),
        ("Apr-24", 2024, "2024-04-01", 1, 1),
        ("Dec-24", 2024, "2024-12-26", 1, 0),
    ]
    assert data["totalActions"] == 5


def test_yearly_cycle_anchored_on_february_29(
    client: TestClient, clock: Clock, op: dict[str, str]
) -> None:
    account = new_account(client, op, anchor="2024-02-29", period="year")
    clock.at = datetime(2025, 3, 1, tzinfo=UTC)
    data = ok(client, op, account=account)
    assert (data["startDate"], data["endDate"]) == ("2025-02-28", "2026-02-28")
    clock.at = datetime(2025, 2, 27, tzinfo=UTC)
    data = ok(client, op, account=account)
    assert (data["startDate"], data["endDate"]) == ("2024-02-29", "2025-02-28")


def test_without_a_cycle_the_calendar_month(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(
        action("other", "2025-02-28T23:59:59Z"),
        action("other", "2025-03-01T00:00:00Z"),
        action("other", "2025-03-31T23:59:59Z"),
        action("other", "2025-04-01T00:00:00Z"),
    )
    data = ok(client, tenants.headers("other"))
    assert (data["startDate"], data["endDate"]) == ("2025-03-01", "2025-04-01")
    assert days(data) == {"2025-03-01": 1, "2025-03-31": 1}


def test_the_cycle_is_the_named_accounts(
    client: TestClient, tenants: Tenants, op: dict[str, str]
) -> None:
    # root bills from the 31st; its child has no cycle and bills per calendar month.
    assert ok(client, op, account="root")["startDate"] == "2025-02-28"
    assert ok(client, op, account="child")["startDate"] == "2025-03-01"


# ----------------------------------------------------------- app / api split


def test_app_and_api_split(client: TestClient, tenants: Tenants, send: Any) -> None:
    send(
        action("other", "2025-03-10T01:00:00Z", "app"),
        action("other", "2025-03-10T02:00:00Z", "app"),
        action("other", "2025-03-10T03:00:00Z", "app"),
        action("other", "2025-03-10T04:00:00Z", "api"),
        action("other", "2025-03-10T05:00:00Z"),  # no source: an API action
        action("other", "2025-03-10T06:00:00Z", "cli"),  # not app: an API action
        action("other", "2025-03-11T06:00:00Z", "App"),  # values are exact: not app
    )
    data = ok(client, tenants.headers("other"), timePeriod="7-days")
    assert [(e["date"], e["appActions"], e["apiActions"], e["count"]) for e in data["data"]] == [
        ("2025-03-10", 3, 3, 6),
        ("2025-03-11", 0, 1, 1),
    ]


def test_non_billable_actions_count(client: TestClient, tenants: Tenants, send: Any) -> None:
    send(event("a1", "other", "actions", "2025-03-10T00:00:00Z", billable=False))
    assert days(ok(client, tenants.headers("other"), timePeriod="7-days")) == {"2025-03-10": 1}


# ------------------------------------------------------------------- tenancy


def test_a_parent_sees_its_descendants_and_a_child_only_its_subtree(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    ts = "2025-03-10T00:00:00Z"
    send(
        action("root", ts, "app"),
        action("child", ts, "app"),
        action("grandchild", ts, "api"),
        action("sibling", ts, "api"),
        action("other", ts, "app"),
    )

    def split(headers: dict[str, str], **params: str) -> tuple[int, int]:
        [entry] = ok(client, headers, timePeriod="7-days", **params)["data"]
        return entry["appActions"], entry["apiActions"]

    assert split(tenants.headers("root")) == (2, 2)
    assert split(tenants.headers("child")) == (1, 1)
    assert split(tenants.headers("grandchild")) == (0, 1)
    assert split(tenants.headers("sibling")) == (0, 1)
    assert split(tenants.headers("other")) == (1, 0)
    assert split(tenants.headers("root"), account="child") == (1, 1)


@pytest.mark.parametrize(
    ("caller", "account"),
    [
        ("child", "root"),
        ("child", "sibling"),
        ("grandchild", "child"),
        ("other", "root"),
        ("root", "other"),
        ("root", "nope"),
    ],
)
def test_an_account_key_may_not_read_above_or_beside_it(
    client: TestClient, tenants: Tenants, caller: str, account: str
) -> None:
    response = get(client, tenants.headers(caller), account=account)
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "code": 404,
            "message": f"account {account!r} not found, or this key may not read it",
        }
    }


def test_operator_names_the_account(
    client: TestClient, tenants: Tenants, op: dict[str, str], send: Any
) -> None:
    send(action("child", "2025-03-10T00:00:00Z"), action("other", "2025-03-10T00:00:00Z"))
    assert days(ok(client, op, account="child", timePeriod="7-days")) == {"2025-03-10": 1}
    response = get(client, op)
    assert response.status_code == 400
    assert "?account=" in response.json()["error"]["message"]
    response = get(client, op, account="nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404


# -------------------------------------------------------------------- errors


def error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == status
    message: str = body["error"]["message"]
    return message


def test_missing_or_invalid_key_is_401(client: TestClient, tenants: Tenants) -> None:
    secret = tenants.secrets["other"]
    for headers in (
        {},
        {"Authorization": "bearer nope"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {secret}"},
        {"Authorization": secret},
        {"X-Api-Key": secret},
    ):
        assert "Authorization: bearer" in error(get(client, headers), 401)


def test_scheme_is_case_insensitive(client: TestClient, tenants: Tenants) -> None:
    secret = tenants.secrets["other"]
    for scheme in ("bearer", "Bearer", "BEARER", "bEaReR"):
        assert get(client, {"Authorization": f"{scheme} {secret}"}).status_code == 200


def test_revoked_key_is_401(client: TestClient, tenants: Tenants, op: dict[str, str]) -> None:
    assert client.delete("/v1/keys/key_other", headers=op).status_code == 200
    error(get(client, tenants.headers("other")), 401)


def test_version_is_required_and_must_be_supported(client: TestClient, tenants: Tenants) -> None:
    headers = tenants.headers("other")
    for version in (None, "", "2024-01", "2025-9", "latest"):
        sent = headers if version is None else {**headers, "x-api-version": version}
        response = client.get(PATH, headers=sent)
        message = error(response, 400)
        assert "x-api-version" in message
        assert "2025-09" in message
    response = client.get(PATH, headers={**headers, "X-API-VERSION": "2025-09"})
    assert response.status_code == 200


@pytest.mark.parametrize("value", ["", "7days", "7-Days", "week", "1-year", "current"])
def test_unknown_time_period_lists_the_allowed_values(
    client: TestClient, tenants: Tenants, value: str
) -> None:
    message = error(get(client, tenants.headers("other"), timePeriod=value), 400)
    assert "timePeriod" in message
    for allowed in ("7-days", "30-days", "3-months", "current-billing-cycle"):
        assert allowed in message


def test_every_parameter_problem_at_once(client: TestClient, op: dict[str, str]) -> None:
    response = client.get(PATH, headers=op, params={"timePeriod": "week"})
    message = error(response, 400)
    assert "x-api-version" in message
    assert "timePeriod" in message
    assert "account" in message


def test_key_without_read_scope_is_403(
    client: TestClient, tenants: Tenants, op: dict[str, str]
) -> None:
    response = client.post("/v1/accounts/other/keys", json={"scopes": ["ingest"]}, headers=op)
    assert response.status_code == 201, response.text
    headers = {"Authorization": f"Bearer {response.json()['key']}"}
    assert "read scope" in error(get(client, headers), 403)


def test_a_key_is_checked_before_the_parameters(client: TestClient) -> None:
    error(client.get(PATH, params={"timePeriod": "week"}), 401)


# ------------------------------------------------------------------- openapi


def test_endpoint_is_in_the_openapi_document(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    operation = document["paths"][PATH]["get"]
    names = {p["name"] for p in operation["parameters"]}
    assert {"timePeriod", "account", "x-api-version"} <= names
    assert {"200", "400", "401", "404"} <= set(operation["responses"])
    assert operation["security"]


# ---------------------------------------------------------------- properties

SOURCES = st.sampled_from(["app", "api", None, "web"])


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    events=st.lists(
        st.tuples(st.integers(min_value=-100 * 86400, max_value=2 * 86400), SOURCES),
        max_size=40,
    ),
    name=st.sampled_from(["7-days", "30-days", "3-months", "current-billing-cycle"]),
)
def test_entries_match_a_naive_count(
    client: TestClient,
    op: dict[str, str],
    send: Any,
    events: list[tuple[int, str | None]],
    name: str,
) -> None:
    # The clock: 2025-03-15 12:00 UTC. Events land up to 100 days before it and 2 after.
    now = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
    account = new_account(client, op)
    if events:
        send(
            *(
                action(account, (now + timedelta(seconds=s)).isoformat(), source)
                for s, source in events
            )
        )
    data = ok(client, op, account=account, timePeriod=name)
    first = date.fromisoformat(data["startDate"])
    last = date.fromisoformat(data["endDate"])
    if name == "current-billing-cycle":
        last -= timedelta(days=1)  # endDate is the next cycle's start
    daily = (last - first).days + 1 <= 31

    expected: dict[Any, list[Any]] = defaultdict(lambda: [None, 0, 0])
    for s, source in events:
        day = (now + timedelta(seconds=s)).date()
        if not first <= day <= last:
            continue
        slot = expected[day if daily else (day.year, day.month)]
        slot[0] = min(slot[0] or day, day)
        slot[1 if source == "app" else 2] += 1
    want = [(d.isoformat(), app, api, app + api) for d, app, api in sorted(expected.values())]
    got = [(e["date"], e["appActions"], e["apiActions"], e["count"]) for e in data["data"]]
    assert got == want
    assert data["totalActions"] == sum(w[3] for w in want)
    for entry in data["data"]:
        day = date.fromisoformat(entry["date"])
        assert entry["year"] == day.year
        assert entry["month"] == day.strftime("%b-%y")
