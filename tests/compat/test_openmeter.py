"""OpenMeter's API, driven by OpenMeter's own Python client against a real server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from corehttp.exceptions import HttpResponseError
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from openmeter import Client
from openmeter._generated.models import Event

from tests.compat.conftest import native_query, write_meters
from tests.conftest import Tenants
from usagemeter.api.app import create_app
from usagemeter.auth import issue_key
from usagemeter.meters import MeterRegistry
from usagemeter.model import Account, Scope
from usagemeter.store.sqlite import SQLiteStore

T0 = datetime(2024, 11, 2, 20, 0, tzinfo=UTC)  # New York's fall-back day follows


def cloud_event(id: str, subject: str, time: datetime, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": id,
        "source": "my-app",
        "type": "prompt",
        "subject": subject,
        "time": time.isoformat(),
        "data": data,
    }


@pytest.fixture
def openmeter(server: str, tenants: Tenants) -> Iterator[Client]:
    """The client as a root account user runs it: only the endpoint is ours."""
    with Client(endpoint=f"{server}/openmeter", token=tenants.secrets["root"]) as client:
        yield client


@pytest.fixture
def ops(server: str, operator_secret: str) -> Iterator[Client]:
    """The client as the provider's backend runs it, sending for every subject."""
    with Client(endpoint=f"{server}/openmeter", token=operator_secret) as client:
        yield client


def native_total(server: str, tenants: Tenants, **params: str) -> Any:
    return native_query(server, tenants, "prompt", **params)["total"]


def test_single_and_batch_ingest_count_a_retry_once(
    openmeter: Client, server: str, tenants: Tenants
) -> None:
    openmeter.events.ingest_event(cloud_event("e1", "root", T0, tokens=10, model="gpt"))
    batch = [
        cloud_event("e2", "root", T0 + timedelta(hours=1), tokens=20, model="gpt"),
        cloud_event("e3", "child", T0 + timedelta(hours=2), tokens=5, model="claude"),
    ]
    tenant_ops = Client(endpoint=f"{server}/openmeter", token=tenants.secrets["child"])
    tenant_ops.events.ingest_event(batch[1])  # the child's own key sends for the child
    openmeter.events.ingest_events([batch[0]])
    openmeter.events.ingest_events([batch[0]])  # a retry: counted once
    tenant_ops.events.ingest_event(batch[1])
    openmeter.events.ingest_event(cloud_event("e1", "root", T0, tokens=10, model="gpt"))

    assert native_total(server, tenants) == 35
    assert native_total(server, tenants, aggregation="count") == 3
    result = openmeter.meters.query_json("tokens_total")
    assert [row.value for row in result.data] == [35]


def test_the_clients_event_model_and_plain_json(
    openmeter: Client, server: str, tenants: Tenants
) -> None:
    openmeter.events.ingest_event(
        Event(
            id="m1",
            source="my-app",
            specversion="1.0",
            type="prompt",
            subject="root",
            time=T0,
            data={"tokens": "12.5"},  # a number as text, as OpenMeter reads it
        )
    )
    plain = httpx.post(
        f"{server}/openmeter/api/v1/events",
        json=[cloud_event("m2", "root", T0, tokens=0.5)],
        headers=tenants.headers("root"),
    )
    assert plain.status_code == 204, plain.text
    assert native_total(server, tenants) == 13
    wrong_type = httpx.post(
        f"{server}/openmeter/api/v1/events",
        content=b"id=1",
        headers={**tenants.headers("root"), "content-type": "application/x-www-form-urlencoded"},
    )
    assert wrong_type.status_code == 400
    assert "application/cloudevents+json" in wrong_type.json()["detail"]


def test_the_same_id_from_another_source_is_another_event(
    openmeter: Client, server: str, tenants: Tenants
) -> None:
    event = cloud_event("e1", "root", T0, tokens=1)
    openmeter.events.ingest_events([event, {**event, "source": "other-app"}])
    assert native_total(server, tenants, aggregation="count") == 2


def test_a_bad_event_rejects_the_batch_with_a_problem(
    openmeter: Client, server: str, tenants: Tenants
) -> None:
    good = cloud_event("ok", "root", T0, tokens=3)
    no_value = cloud_event("bad", "root", T0, model="gpt")  # the meters read $.tokens
    with pytest.raises(HttpResponseError) as caught:
        openmeter.events.ingest_events(
            [
                good,
                no_value,
                {**good, "id": "x", "subject": "ghost"},
                {**good, "id": "y", "time": 1736935200},  # CloudEvents time is RFC 3339 text
            ]
        )
    assert caught.value.status_code == 400
    problem = caught.value.response.json()
    assert caught.value.response.headers["content-type"] == "application/problem+json"
    assert problem["status"] == 400 and problem["title"] == "Bad Request"
    assert problem["instance"] == "/openmeter/api/v1/events"
    errors = problem["extensions"]["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [(1, "data"), (2, "subject"), (3, "time")]
    assert "$.tokens" in errors[0]["message"] and "ghost" in errors[1]["message"]
    assert native_total(server, tenants, aggregation="count") == 0  # nothing of it stored


def test_an_account_key_sends_only_for_its_own_subject(server: str, tenants: Tenants) -> None:
    with Client(endpoint=f"{server}/openmeter", token=tenants.secrets["other"]) as other:
        with pytest.raises(HttpResponseError) as caught:
            other.events.ingest_event(cloud_event("e", "root", T0, tokens=1))
        assert caught.value.status_code == 400
        assert "may not send events for account 'root'" in caught.value.response.json()["detail"]
        with pytest.raises(HttpResponseError) as caught:
            other.meters.query_json("tokens_total", subject=["root"])
        assert caught.value.status_code == 404
    _, ingest_only = issue_key(tenants.store, "root", scopes=[Scope.INGEST])
    with Client(endpoint=f"{server}/openmeter", token=ingest_only) as sender:
        sender.events.ingest_event(cloud_event("e", "root", T0, tokens=1))
        with pytest.raises(HttpResponseError) as caught:
            sender.meters.query_json("tokens_total")
        assert caught.value.status_code == 403
    with Client(endpoint=f"{server}/openmeter", token="wrong") as stranger:
        with pytest.raises(HttpResponseError) as caught:
            stranger.meters.list()
        assert caught.value.status_code == 401


def test_meters_are_listed_as_declared(openmeter: Client) -> None:
    meters = {m.slug: m for m in openmeter.meters.list()}
    assert set(meters) == {"tokens_total", "tokens_avg", "tokens_max", "prompts", "users"}
    assert meters["tokens_avg"].aggregation == "AVG"
    assert meters["tokens_total"].group_by == {"model": "$.model"}
    assert openmeter.meters.get("users").value_property == "$.user.id"


EVENTS = [
    # (hours after T0, subject, tokens, model, user): around New York's repeated 01:00 on
    # 2024-11-03 (05:00-07:00 UTC) and across Kolkata's midnight (18:30 UTC).
    (0, "root", 10, "gpt", "u1"),
    (3.5, "child", 4, "claude", "u2"),
    (9.25, "root", 7, "gpt", "u1"),  # 05:15 UTC: the first 01:00 in New York
    (10.5, "root", 2, "claude", "u3"),  # 06:30 UTC: the second 01:00
    (22.75, "child", 30, "gpt", "u2"),  # 18:45 UTC: Kolkata's next day
    (30, "root", 1, "gpt", "u4"),
]


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Kolkata"])
def test_windows_in_a_zone_match_the_native_query(
    openmeter: Client, ops: Client, server: str, tenants: Tenants, zone: str
) -> None:
    ops.events.ingest_events(
        [
            cloud_event(
                f"w{i}", subject, T0 + timedelta(hours=h), tokens=t, model=m, user={"id": u}
            )
            for i, (h, subject, t, m, u) in enumerate(EVENTS)
        ]
    )
    start, end = T0 - timedelta(days=1), T0 + timedelta(days=3)
    for slug, aggregation in [("tokens_total", "sum"), ("tokens_avg", "avg")]:
        for window in ["HOUR", "DAY"]:
            result = openmeter.meters.query_json(
                slug, from_parameter=start, to=end, window_size=window, window_time_zone=zone
            )
            native = native_query(
                server,
                tenants,
                "prompt",
                aggregation=aggregation,
                start=start.isoformat(),
                end=end.isoformat(),
                granularity=window.lower(),
                tz=zone,
            )
            expected = [
                (datetime.fromisoformat(b["start"]), datetime.fromisoformat(b["end"]), g["value"])
                for b in native["buckets"]
                for g in b["groups"]
            ]
            rows = [(r.window_start, r.window_end, r.value) for r in result.data]
            assert rows == expected, (slug, window)
            assert len(expected) >= 2  # the events fall in several windows
            assert result.window_size == window
    if zone == "America/New_York":  # the repeated 01:00 of 2024-11-03: two windows
        hours = openmeter.meters.query_json(
            "tokens_total", from_parameter=start, to=end, window_size="HOUR", window_time_zone=zone
        )
        ones = [r.window_start for r in hours.data if r.window_start.hour == 1]
        assert [t.utcoffset() for t in ones] == [timedelta(hours=-4), timedelta(hours=-5)]


def test_avg_over_the_range_is_sum_over_count_not_a_mean_of_windows(
    openmeter: Client, server: str
) -> None:
    openmeter.events.ingest_events(
        [
            cloud_event(f"a{i}", "root", T0 + timedelta(hours=h), tokens=t)
            for i, (h, t) in enumerate([(0, 1), (0.5, 2), (30, 9)])
        ]
    )
    whole = openmeter.meters.query_json("tokens_avg")
    assert [row.value for row in whole.data] == [4]  # (1 + 2 + 9) / 3; daily means give 5.25
    daily = openmeter.meters.query_json("tokens_avg", window_size="DAY")
    assert [row.value for row in daily.data] == [1.5, 9]


def test_group_by_subject_and_property_and_filter(openmeter: Client, ops: Client) -> None:
    ops.events.ingest_events(
        [
            cloud_event(f"g{i}", s, T0 + timedelta(hours=h), tokens=t, model=m, user={"id": u})
            for i, (h, s, t, m, u) in enumerate(EVENTS)
        ]
    )
    grouped = openmeter.meters.query_json("tokens_total", group_by=["subject", "model"])
    assert sorted((r.subject, r.group_by["model"], r.value) for r in grouped.data) == [
        ("child", "claude", 4),
        ("child", "gpt", 30),
        ("root", "claude", 2),
        ("root", "gpt", 18),
    ]
    only = openmeter.meters.query_json("tokens_total", filter_group_by={"model": "claude"})
    assert [r.value for r in only.data] == [6]
    posted = openmeter.meters.query(  # the same questions with a JSON body
        "tokens_total", {"groupBy": ["subject", "model"], "filterGroupBy": {"model": ["gpt"]}}
    )
    assert sorted((r.subject, r.value) for r in posted.data) == [("child", 30), ("root", 18)]
    with pytest.raises(HttpResponseError) as caught:
        openmeter.meters.query("tokens_total", {"filterGroupBy": {"model": ["gpt", "claude"]}})
    assert "give one value" in caught.value.response.json()["detail"]
    child = openmeter.meters.query_json("prompts", subject=["child"])
    assert [(r.subject, r.value) for r in child.data] == [("child", 2)]
    users = openmeter.meters.query_json("users")
    assert [r.value for r in users.data] == [4]  # u1..u4, distinct over the range
    assert openmeter.meters.list_subjects("tokens_total") == ["child", "root"]
    assert openmeter.meters.list_group_by_values("tokens_total", "model") == ["claude", "gpt"]
    early = openmeter.meters.list_subjects("prompts", to=T0 + timedelta(hours=1))
    assert early == ["root"]
    highest = openmeter.meters.query_json("tokens_max", window_size="MONTH")
    assert [r.value for r in highest.data] == [30]


def test_bad_queries_get_problems_that_say_what_to_fix(
    openmeter: Client, server: str, tenants: Tenants
) -> None:
    for kwargs, needle in [
        ({"window_size": "MINUTE"}, "windowSize"),
        ({"window_time_zone": "Mars/Olympus"}, "windowTimeZone"),
        ({"group_by": ["region"]}, "no group 'region'"),
        ({"window_size": "HOUR", "from_parameter": datetime(2000, 1, 1, tzinfo=UTC)}, "windows"),
    ]:
        with pytest.raises(HttpResponseError) as caught:
            openmeter.meters.query_json("tokens_total", **kwargs)
        assert caught.value.status_code == 400
        assert needle in caught.value.response.json()["detail"]
    deep, too_long = "[" * 2000 + "]" * 2000, "[" * 3000 + "]" * 3000
    for text in ["__import__('os')", deep, too_long, '{"model": 4}']:
        answer = httpx.get(  # never evaluated, never a 500
            f"{server}/openmeter/api/v1/meters/tokens_total/query",
            params={"filterGroupBy": text},
            headers=tenants.headers("root"),
        )
        assert answer.status_code == 400, text
        assert "filterGroupBy" in answer.json()["detail"]
    with pytest.raises(HttpResponseError) as caught:
        openmeter.meters.query_json("nope")
    assert caught.value.status_code == 404


@settings(max_examples=15, deadline=None)
@given(
    sends=st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["app", "app/eu", "app%2Feu", "https://x.example/a"]),
                st.sampled_from(["1", "eu/1", "2"]),
                st.integers(0, 1000),
            ),
            min_size=1,
            max_size=6,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_source_and_id_are_counted_once_however_sent(
    tmp_path_factory: pytest.TempPathFactory, sends: list[list[tuple[str, str, int]]]
) -> None:
    """Any batches, retries and repeats: the meter sums each (source, id) once, the first
    time it is stored; sources and ids with '/' in them never collide."""
    store = SQLiteStore(tmp_path_factory.mktemp("om") / "om.db")
    store.create_account(Account("root", "Root"))
    _, secret = issue_key(store, None, scopes=[Scope.OPERATOR])
    meters = MeterRegistry.from_file(write_meters(tmp_path_factory.mktemp("m")))
    first: dict[tuple[str, str], int] = {}
    with TestClient(create_app(store, meters)) as http:
        headers = {"Authorization": f"Bearer {secret}"}
        for batch in sends:
            body = [
                {**cloud_event(id, "root", T0, tokens=tokens), "source": source}
                for source, id, tokens in batch
            ]
            response = http.post("/openmeter/api/v1/events", json=body, headers=headers)
            assert response.status_code == 204, response.text
            for source, id, tokens in batch:
                first.setdefault((source, id), tokens)
        rows = http.get("/openmeter/api/v1/meters/tokens_total/query", headers=headers).json()
    assert [row["value"] for row in rows["data"]] == [sum(first.values())]
    store.close()


def test_usagemeter_serve_reads_the_peer_meters_from_its_meters_file(
    tmp_path: Path, meters_file: Path
) -> None:
    """The command a provider runs, as a subprocess: ``serve --meters`` with OpenMeter's
    meters in the file, then OpenMeter's client against it."""
    db = tmp_path / "served.db"
    store = SQLiteStore(db)
    store.create_account(Account("acme", "Acme"))
    _, secret = issue_key(store, None, scopes=[Scope.OPERATOR])
    store.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "usagemeter", "serve", "--db", str(db), "--port", str(port)]
    proc = subprocess.Popen(
        [*argv, "--meters", str(meters_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "serve did not start within 60 s"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with Client(endpoint=f"{base}/openmeter", token=secret) as client:
            client.events.ingest_events(
                [cloud_event(f"s{i}", "acme", T0, tokens=t) for i, t in enumerate([3, 5, 10])]
            )
            assert [r.value for r in client.meters.query_json("tokens_avg").data] == [6]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
