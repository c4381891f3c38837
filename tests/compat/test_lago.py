"""Lago's events API, driven by Lago's own Python client against a real server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from lago_python_client.client import Client
from lago_python_client.exceptions import LagoApiError
from lago_python_client.models.event import BatchEvent, Event

from tests.compat.conftest import native_query
from tests.conftest import Tenants

JAN_15 = 1_736_935_200  # 2025-01-15T10:00:00Z, in Unix seconds as Lago sends it


def lago(server: str, secret: str) -> Client:
    return Client(api_key=secret, api_url=f"{server}/lago/")  # the one line that changes


def native(server: str, tenants: Tenants, metric: str, **params: str) -> Any:
    return native_query(server, tenants, metric, **{"group_by": "region", **params})


def event(transaction_id: str, code: str = "storage", **properties: Any) -> Event:
    return Event(
        transaction_id=transaction_id,
        external_subscription_id="root",
        code=code,
        timestamp=JAN_15,
        properties=properties,
    )


def test_single_and_batch_ingest_count_a_retry_once(server: str, tenants: Tenants) -> None:
    client = lago(server, tenants.secrets["root"])
    answer = client.events.create(event("t1", gb="1.5", region="eu"))
    assert answer is not None
    assert (answer.transaction_id, answer.code, answer.external_subscription_id) == (
        "t1",
        "storage",
        "root",
    )
    assert answer.timestamp == "2025-01-15T10:00:00Z"
    batch = BatchEvent(events=[event("t2", gb=2, region="eu"), event("t3", gb=4, region="us")])
    client.events.batch_create(batch)
    client.events.batch_create(batch)  # a retry of the whole batch: counted once
    client.events.create(event("t1", gb="1.5", region="eu"))
    for transaction_id in ("c1", "c2", "c1"):
        client.events.create(event(transaction_id, code="api_calls"))

    storage = native(server, tenants, "storage")
    assert storage["total"] == 7.5  # field_name gb, summed as its sum_agg says
    assert {t["group"]["region"]: t["value"] for t in storage["totals"]} == {"eu": 3.5, "us": 4}
    assert native(server, tenants, "api_calls", group_by="")["total"] == 2  # count_agg


def test_a_bad_event_rejects_the_batch_in_lagos_envelope(server: str, tenants: Tenants) -> None:
    client = lago(server, tenants.secrets["root"])
    batch = BatchEvent(
        events=[
            event("ok", gb=1),
            event("no-value", region="eu"),  # storage reads its value from gb
            Event(
                transaction_id="x",
                external_subscription_id="sibling",
                code="storage",
                timestamp=JAN_15,
                properties={"gb": 1},
            ),  # not this key's account
        ]
    )
    with pytest.raises(LagoApiError) as caught:
        client.events.batch_create(batch)
    assert caught.value.status_code == 422
    body = caught.value.response
    assert (body["status"], body["error"], body["code"]) == (
        422,
        "Unprocessable Entity",
        "validation_errors",
    )
    details = body["error_details"]
    assert set(details) == {"1", "2"}
    assert "'gb' must hold a number" in details["1"]["properties"][0]
    assert "may not send events" in details["2"]["external_subscription_id"][0]
    assert native(server, tenants, "storage")["total"] == 0  # nothing of the batch kept


def test_too_many_events_and_a_wrong_key(server: str, tenants: Tenants) -> None:
    client = lago(server, tenants.secrets["root"])
    with pytest.raises(LagoApiError) as caught:
        client.events.batch_create(BatchEvent(events=[event(f"t{i}", gb=1) for i in range(101)]))
    assert caught.value.response["error_details"] == {"events": ["too_many_events"]}
    with pytest.raises(LagoApiError) as caught:
        lago(server, "wrong").events.create(event("t", gb=1))
    assert caught.value.status_code == 401
    assert caught.value.response == {"status": 401, "error": "Unauthorized"}


def test_a_single_bad_event_names_its_fields(server: str, tenants: Tenants) -> None:
    def details(**fields: Any) -> Any:
        base = {"transaction_id": "t", "code": "storage", "external_customer_id": "root"}
        response = httpx.post(
            f"{server}/lago/api/v1/events",
            json={"event": {**base, **fields}},
            headers=tenants.headers("root"),
        )
        assert response.status_code == 422, response.text
        return response.json()["error_details"]

    # The first problem of the event, by field: here the missing transaction_id.
    assert list(details(transaction_id=None, timestamp="soon")) == ["transaction_id"]
    reserved = details(properties={"gb": 1, "key": "k"})  # 'key' is a reserved dimension
    assert "'key' is reserved" in reserved["properties"][0]
    for timestamp in ["soon", 1e30, JAN_15 * 1000]:  # milliseconds are a unit mistake here
        assert details(timestamp=timestamp, properties={"gb": 1}) == {
            "timestamp": ["Unix seconds from 2000 to 2199, e.g. 1735689600"]
        }


def test_a_body_past_16_mib_is_refused_in_lagos_envelope(server: str, tenants: Tenants) -> None:
    response = httpx.post(
        f"{server}/lago/api/v1/events/batch",
        content=b" " * (16 * 1024 * 1024 + 1),
        headers={**tenants.headers("root"), "content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json() == {"status": 413, "error": "Payload Too Large"}
