"""GET /keys/{key}/usage over the real app and a real SQLite file."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
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

DAY_MS = 24 * 60 * 60 * 1000
# The conftest clock: 2025-03-15 12:00 UTC.
NOW_MS = int(datetime(2025, 3, 15, 12, 0, tzinfo=UTC).timestamp()) * 1000


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def path(key: str) -> str:
    return f"/keys/{key}/usage"


def get(client: TestClient, key: str, headers: dict[str, str] | None = None, **params: Any) -> Any:
    return client.get(path(key), headers=headers or {}, params=params)


def ok(
    client: TestClient, key: str, headers: dict[str, str] | None = None, **params: Any
) -> dict[str, Any]:
    response = get(client, key, headers, **params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == 2000
    assert body["message"] == "Success"
    result: dict[str, Any] = body["result"]
    assert result["total"] == sum(d["count"] for d in result["dailyCount"])
    return result


def error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"}
    assert body["code"] == status * 10
    assert body["message"]
    message: str = body["message"]
    return message


def lookup(account: str, ts: str | int, key: str | None = None, **fields: Any) -> dict[str, Any]:
    return event(uuid.uuid4().hex, account, "lookups", ts, key=key or f"key_{account}", **fields)


def counts(result: dict[str, Any]) -> dict[str, int]:
    return {d["date"]: d["count"] for d in result["dailyCount"]}


# ------------------------------------------------------------------ range


def test_defaults_are_the_last_21_days_up_to_now(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    start = NOW_MS - 21 * DAY_MS
    send(
        lookup("root", start - 1),  # just before the default start
        lookup("root", start),
        lookup("root", NOW_MS - DAY_MS),
        lookup("root", NOW_MS),
        lookup("root", NOW_MS + 1),  # a millisecond after now
    )
    result = ok(client, "key_root", tenants.headers("root"))
    assert result["start"] == "2025-02-22T12:00:00Z"
    assert result["end"] == "2025-03-15T12:00:00Z"
    assert result["total"] == 3
    dates = [d["date"] for d in result["dailyCount"]]
    # Every UTC day the range touches, 2025-02-22 to 2025-03-15, zero-filled and in order.
    assert dates == [(date(2025, 2, 22) + timedelta(days=i)).isoformat() for i in range(22)]
    assert counts(result)["2025-02-22"] == 1
    assert counts(result)["2025-03-14"] == 1
    assert counts(result)["2025-03-15"] == 1
    assert sum(1 for d in result["dailyCount"] if d["count"] == 0) == 19


def test_defaults_follow_the_pinned_clock(
    client: TestClient, tenants: Tenants, clock: Clock, send: Any
) -> None:
    clock.at = datetime(2024, 7, 1, 0, 0, 0, 250_000, tzinfo=UTC)
    send(lookup("root", "2024-06-30T23:59:59.999Z"))
    result = ok(client, "key_root", tenants.headers("root"))
    assert result["start"] == "2024-06-10T00:00:00.250Z"
    assert result["end"] == "2024-07-01T00:00:00.250Z"
    assert result["total"] == 1
    assert result["dailyCount"][-1] == {"date": "2024-07-01", "count": 0}


def test_default_start_is_21_days_before_now_even_when_end_is_given(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(lookup("root", NOW_MS - 21 * DAY_MS), lookup("root", NOW_MS - 10 * DAY_MS))
    result = ok(client, "key_root", tenants.headers("root"), end=NOW_MS - 5 * DAY_MS)
    assert result["start"] == "2025-02-22T12:00:00Z"
    assert result["end"] == "2025-03-10T12:00:00Z"
    assert result["total"] == 2
    # An end before that default start needs a start of its own.
    response = get(client, "key_root", tenants.headers("root"), end=NOW_MS - 30 * DAY_MS)
    assert "send a start" in error(response, 400)


def test_default_end_is_now(client: TestClient, tenants: Tenants, send: Any) -> None:
    send(lookup("root", NOW_MS - 2 * DAY_MS), lookup("root", NOW_MS + 1))
    result = ok(client, "key_root", tenants.headers("root"), start=NOW_MS - 3 * DAY_MS)
    assert result["end"] == "2025-03-15T12:00:00Z"
    assert result["total"] == 1
    response = get(client, "key_root", tenants.headers("root"), start=NOW_MS + 1)
    assert "end defaults to now" in error(response, 400)


def test_90_days_is_allowed_and_one_millisecond_more_is_not(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    start = ms("2024-12-01T08:30:00.123")
    end = start + 90 * DAY_MS
    send(lookup("root", start), lookup("root", end))
    result = ok(client, "key_root", tenants.headers("root"), start=start, end=end)
    assert result["total"] == 2
    assert len(result["dailyCount"]) == 91  # a ragged 90-day range touches 91 UTC days
    message = error(get(client, "key_root", tenants.headers("root"), start=start, end=end + 1), 400)
    assert "90 days" in message
    message = error(get(client, "key_root", tenants.headers("root"), start=start - 1, end=end), 400)
    assert "90 days" in message


def test_both_ends_are_inclusive_to_the_millisecond(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    start = ms("2025-03-01T10:07:13.457")
    end = ms("2025-03-03T17:52:41.001")
    send(
        lookup("root", start - 1),
        lookup("root", start),
        lookup("root", start + 1),
        lookup("root", end - 1),
        lookup("root", end),
        lookup("root", end + 1),
    )
    result = ok(client, "key_root", tenants.headers("root"), start=start, end=end)
    assert result["start"] == "2025-03-01T10:07:13.457Z"
    assert result["end"] == "2025-03-03T17:52:41.001Z"
    assert result["total"] == 4
    assert counts(result) == {"2025-03-01": 2, "2025-03-02": 0, "2025-03-03": 2}
    # A range of one millisecond holds the events at that very millisecond.
    assert ok(client, "key_root", tenants.headers("root"), start=end, end=end)["total"] == 1


def test_an_end_at_midnight_touches_that_day(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    midnight = ms("2025-03-02T00:00:00")
    send(lookup("root", midnight), lookup("root", midnight - 1))
    result = ok(client, "key_root", tenants.headers("root"), start=midnight - DAY_MS, end=midnight)
    assert counts(result) == {"2025-03-01": 1, "2025-03-02": 1}


# ---------------------------------------------------------------- filters


def test_tags_count_only_lookups_with_all_of_them(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    ts = NOW_MS - DAY_MS
    send(
        lookup("root", ts, tags=["foo"]),
        lookup("root", ts, tags=["bar"]),
        lookup("root", ts, tags=["foo", "bar"]),
        lookup("root", ts, tags=["foo", "bar", "baz"]),
        lookup("root", ts),
    )
    headers = tenants.headers("root")
    assert ok(client, "key_root", headers)["total"] == 5
    assert ok(client, "key_root", headers, tags="foo")["total"] == 3
    assert ok(client, "key_root", headers, tags="foo,bar")["total"] == 2
    assert ok(client, "key_root", headers, tags=" bar , foo ,")["total"] == 2
    assert ok(client, "key_root", headers, tags="foo,bar,baz")["total"] == 1
    assert ok(client, "key_root", headers, tags="qux")["total"] == 0
    assert ok(client, "key_root", headers, tags="")["total"] == 5


def test_licensee_counts_only_that_licensee(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    ts = NOW_MS - DAY_MS
    send(
        lookup("root", ts, dimensions={"licensee": "sl_a"}),
        lookup("root", ts, dimensions={"licensee": "sl_a"}, tags=["foo"]),
        lookup("root", ts, dimensions={"licensee": "sl_b"}, tags=["foo"]),
        lookup("root", ts),
    )
    headers = tenants.headers("root")
    assert ok(client, "key_root", headers, licensee="sl_a")["total"] == 2
    assert ok(client, "key_root", headers, licensee="sl_b")["total"] == 1
    assert ok(client, "key_root", headers, licensee="sl_c")["total"] == 0
    assert ok(client, "key_root", headers, licensee="sl_a", tags="foo")["total"] == 1


def test_counts_billable_lookups_of_this_key_only(
    client: TestClient, tenants: Tenants, store: SQLiteStore, send: Any
) -> None:
    second, _ = issue_key(store, "root", name="second", key_id="key_root_2")
    ts = NOW_MS - DAY_MS
    send(
        lookup("root", ts),
        lookup("root", ts, value=5),  # a lookup is one lookup, whatever its value
        lookup("root", ts, billable=False),  # free: not a paid lookup
        event("e-actions", "root", "actions", ts, key="key_root"),  # another metric
        lookup("root", ts, key=second.id),  # another key of the same account
        event("e-no-key", "root", "lookups", ts),  # no key named
        lookup("child", ts),  # a subaccount's key
    )
    assert ok(client, "key_root", tenants.headers("root"))["total"] == 2
    assert ok(client, second.id, tenants.headers("root"))["total"] == 1


# ----------------------------------------------------------------- tenancy


@pytest.mark.parametrize(
    ("caller", "target"),
    [
        ("root", "root"),
        ("root", "child"),
        ("root", "grandchild"),
        ("child", "grandchild"),
        ("sibling", "sibling"),
    ],
)
def test_the_keys_account_and_accounts_above_it_see_the_key(
    client: TestClient, tenants: Tenants, send: Any, caller: str, target: str
) -> None:
    send(lookup(target, NOW_MS))
    assert ok(client, f"key_{target}", tenants.headers(caller))["total"] == 1


def test_an_operator_sees_every_key(
    client: TestClient, tenants: Tenants, op: dict[str, str], send: Any
) -> None:
    send(lookup("other", NOW_MS))
    assert ok(client, "key_other", op)["total"] == 1


@pytest.mark.parametrize(
    ("caller", "target"),
    [
        ("child", "root"),  # a parent's key
        ("grandchild", "child"),
        ("sibling", "child"),  # a sibling's key
        ("child", "sibling"),
        ("other", "root"),  # another tenant's key
        ("root", "other"),
    ],
)
def test_other_keys_are_not_found(
    client: TestClient, tenants: Tenants, send: Any, caller: str, target: str
) -> None:
    send(lookup(target, NOW_MS))
    hidden = get(client, f"key_{target}", tenants.headers(caller))
    missing = get(client, "key_does_not_exist", tenants.headers(caller))
    error(hidden, 404)
    # The same answer as for a key that does not exist, and nothing about the key.
    assert hidden.json() == missing.json()
    assert target not in hidden.text


def test_a_key_named_with_a_nul_character_is_not_found(
    client: TestClient, tenants: Tenants
) -> None:
    """No key's id holds a NUL, and PostgreSQL cannot even be asked about one: a path naming
    one answers as for any other key that does not exist (it answered a 500)."""
    for ref in ("%00", "key_root%00", "a%00b"):
        missing = get(client, "key_does_not_exist", tenants.headers("root"))
        assert error(get(client, ref, tenants.headers("root")), 404)
        assert get(client, ref, tenants.headers("root")).json() == missing.json()


def test_an_operator_key_in_the_path_is_not_found(
    client: TestClient, op: dict[str, str], operator_secret: str, tenants: Tenants
) -> None:
    ops = [k for k in tenants.store.list_keys(None) if k.is_operator]
    error(get(client, ops[0].id, op), 404)
    error(get(client, operator_secret, op), 404)


def test_a_key_without_read_scope_is_forbidden(
    client: TestClient, tenants: Tenants, store: SQLiteStore
) -> None:
    _, secret = issue_key(store, "root", name="ingest only", scopes=[Scope.INGEST])
    message = error(get(client, "key_root", {"Authorization": f"Bearer {secret}"}), 403)
    assert "read scope" in message


def test_the_full_secret_in_the_path_names_the_key(
    client: TestClient, tenants: Tenants, send: Any, caplog: pytest.LogCaptureFixture
) -> None:
    send(lookup("child", NOW_MS), lookup("child", NOW_MS - 1))
    secret = tenants.secrets["child"]
    with caplog.at_level("DEBUG"):
        by_secret = ok(client, secret, tenants.headers("root"))
        hidden = get(client, secret, tenants.headers("sibling"))
    assert by_secret == ok(client, "key_child", tenants.headers("root"))
    assert by_secret["total"] == 2
    error(hidden, 404)
    assert secret not in hidden.text
    # Nothing server-side logged it (the test's own HTTP client logs the URLs it calls).
    server = [r for r in caplog.records if not r.name.startswith("httpx")]
    assert all(secret not in record.getMessage() for record in server)
    # A wrong secret is simply a key that does not exist.
    error(get(client, secret + "x", tenants.headers("root")), 404)


def test_a_revoked_key_still_reports_its_usage(
    client: TestClient, tenants: Tenants, store: SQLiteStore, send: Any
) -> None:
    send(lookup("child", NOW_MS))
    store.revoke_key("key_child")
    assert ok(client, "key_child", tenants.headers("root"))["total"] == 1
    assert ok(client, tenants.secrets["child"], tenants.headers("root"))["total"] == 1
    # ... but it no longer authenticates.
    error(get(client, "key_child", tenants.headers("child")), 401)


# ------------------------------------------------------------- credentials


def test_user_token_is_a_credential(client: TestClient, tenants: Tenants, send: Any) -> None:
    send(lookup("child", NOW_MS))
    result = ok(client, "key_child", user_token=tenants.secrets["root"])
    assert result["total"] == 1
    error(get(client, "key_child", user_token=tenants.secrets["sibling"]), 404)
    error(get(client, "key_child", user_token="not-a-key"), 401)
    # The header wins over the query parameter.
    response = get(
        client, "key_child", tenants.headers("sibling"), user_token=tenants.secrets["root"]
    )
    error(response, 404)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
def test_no_valid_credential_is_401(
    client: TestClient, tenants: Tenants, headers: dict[str, str]
) -> None:
    message = error(get(client, "key_root", headers), 401)
    assert "Authorization: Bearer" in message or "valid key" in message


def test_401_comes_before_checking_the_key_or_parameters(client: TestClient) -> None:
    error(get(client, "key_does_not_exist", start="soon"), 401)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"start": "yesterday"}, "start: 'yesterday' is not an integer"),
        ({"end": "1418556477882.5"}, "end: '1418556477882.5' is not an integer"),
        ({"start": "1e12"}, "not an integer"),
        ({"start": "2025-03-01"}, "not an integer"),
        ({"start": ""}, "not an integer"),
        ({"end": "-1"}, "outside 1970-2199"),
        ({"end": "99999999999999999"}, "outside 1970-2199"),
        ({"start": str(NOW_MS), "end": str(NOW_MS - 1)}, "is after end"),
        ({"start": str(NOW_MS - 91 * DAY_MS)}, "longer than 90 days"),
        ({"licensee": ""}, "licensee: must not be empty"),
    ],
)
def test_bad_parameters_are_400(
    client: TestClient, tenants: Tenants, params: dict[str, str], fragment: str
) -> None:
    assert fragment in error(get(client, "key_root", tenants.headers("root"), **params), 400)


def test_every_bad_time_is_reported_at_once(client: TestClient, tenants: Tenants) -> None:
    message = error(get(client, "key_root", tenants.headers("root"), start="a", end="b"), 400)
    assert "start:" in message and "end:" in message


def test_a_path_without_a_key_is_not_this_endpoint(client: TestClient, tenants: Tenants) -> None:
    assert client.get("/keys//usage", headers=tenants.headers("root")).status_code == 404


def test_the_endpoint_is_in_the_openapi_document(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/keys/{key}/usage"]["get"]
    names = {p["name"] for p in operation["parameters"]}
    assert {"key", "start", "end", "tags", "licensee", "user_token"} <= names
    assert {"200", "400", "401", "404"} <= set(operation["responses"])
    assert operation["responses"]["200"]["content"]["application/json"]["example"]["code"] == 2000


# --------------------------------------------------------------- property

BASE_MS = ms("2025-03-01T00:00:00")
SPAN_MS = 4 * DAY_MS
_accounts = itertools.count()

lookups_strategy = st.lists(
    st.tuples(
        st.integers(0, SPAN_MS),  # offset from BASE_MS
        st.booleans(),  # billable
        st.frozensets(st.sampled_from(["a", "b", "c"])),
        st.sampled_from([None, "l1", "l2"]),
    ),
    max_size=25,
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    lookups=lookups_strategy,
    data=st.data(),
    tags=st.frozensets(st.sampled_from(["a", "b", "c"]), max_size=2),
    licensee=st.sampled_from([None, "l1", "l2"]),
)
def test_counts_match_a_naive_count(
    client: TestClient,
    store: SQLiteStore,
    send: Any,
    op: dict[str, str],
    lookups: list[tuple[int, bool, frozenset[str], str | None]],
    data: st.DataObject,
    tags: frozenset[str],
    licensee: str | None,
) -> None:
    # A fresh account and key per example, so examples never see each other's events.
    account = f"prop{next(_accounts)}"
    store.create_account(Account(account, account))
    key, _ = issue_key(store, account, key_id=f"key_{account}")
    times = [BASE_MS + offset for offset, *_ in lookups]
    # Bounds anywhere in the span, often exactly on (or next to) an event.
    bound = st.one_of(
        st.integers(BASE_MS - DAY_MS, BASE_MS + SPAN_MS + DAY_MS),
        st.sampled_from(times or [BASE_MS]).flatmap(lambda t: st.sampled_from([t - 1, t, t + 1])),
    )
    start, end = sorted((data.draw(bound), data.draw(bound)))
    if lookups:
        events = []
        for (offset, billable, event_tags, event_licensee), n in zip(
            lookups, itertools.count(), strict=False
        ):
            dims = {"licensee": event_licensee} if event_licensee else {}
            events.append(
                event(
                    f"{account}-{n}",
                    account,
                    "lookups",
                    BASE_MS + offset,
                    key=key.id,
                    billable=billable,
                    tags=sorted(event_tags),
                    dimensions=dims,
                )
            )
        send(*events)
    params: dict[str, Any] = {"start": start, "end": end, "tags": ",".join(sorted(tags))}
    if licensee is not None:
        params["licensee"] = licensee
    result = ok(client, key.id, op, **params)

    expected: Counter[str] = Counter()
    for offset, billable, event_tags, event_licensee in lookups:
        ts = BASE_MS + offset
        if (
            billable
            and start <= ts <= end
            and tags <= event_tags
            and (licensee is None or event_licensee == licensee)
        ):
            expected[datetime.fromtimestamp(ts / 1000, UTC).date().isoformat()] += 1
    first = datetime.fromtimestamp(start / 1000, UTC).date()
    last = datetime.fromtimestamp(end / 1000, UTC).date()
    days = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
    assert [d["date"] for d in result["dailyCount"]] == days
    assert counts(result) == {d: expected[d] for d in days}
    assert result["total"] == sum(expected.values())
