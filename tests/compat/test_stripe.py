"""Stripe's billing meter events, driven by Stripe's own Python client against a real server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import stripe

from tests.compat.conftest import native_query
from tests.conftest import Tenants

JAN_15 = 1_736_935_200  # 2025-01-15T10:00:00Z


@pytest.fixture
def stripe_here(server: str, operator_secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's global settings as a Stripe user has them, pointed here."""
    monkeypatch.setattr(stripe, "api_base", f"{server}/stripe")  # the one line that changes
    monkeypatch.setattr(stripe, "api_key", operator_secret)
    monkeypatch.setattr(stripe, "max_network_retries", 0)


def native(server: str, tenants: Tenants, **params: str) -> Any:
    # January 2025 only: an event sent without a timestamp is stamped now (March).
    return native_query(
        server, tenants, "api_requests", **{"start": "2025-01-01", "end": "2025-02-01", **params}
    )


@pytest.mark.usefixtures("stripe_here")
def test_meter_events_count_a_retried_identifier_once(server: str, tenants: Tenants) -> None:
    event = stripe.billing.MeterEvent.create(
        event_name="api_requests",
        payload={"stripe_customer_id": "root", "value": "25", "region": "eu"},
        identifier="req-1",
        timestamp=JAN_15,
    )
    assert (event.object, event.event_name, event.identifier, event.timestamp) == (
        "billing.meter_event",
        "api_requests",
        "req-1",
        JAN_15,
    )
    assert event.payload["value"] == "25"
    stripe.billing.MeterEvent.create(  # a retry: acknowledged, counted once
        event_name="api_requests",
        payload={"stripe_customer_id": "root", "value": "25", "region": "eu"},
        identifier="req-1",
        timestamp=JAN_15,
    )
    stripe.billing.MeterEvent.create(
        event_name="api_requests",
        payload={"stripe_customer_id": "child", "value": "5"},
        timestamp=JAN_15,
    )
    for _ in range(2):  # no identifier: the client's retries keep one Idempotency-Key
        stripe.billing.MeterEvent.create(
            event_name="api_requests",
            payload={"stripe_customer_id": "child", "value": "100"},
            timestamp=JAN_15,
            idempotency_key="retry-7",
        )
    assert native(server, tenants)["total"] == 130
    assert native(server, tenants, aggregation="count")["total"] == 3
    by_region = native(server, tenants, group_by="region")["totals"]
    assert {t["group"]["region"]: t["value"] for t in by_region} == {"eu": 25, None: 105}


@pytest.mark.usefixtures("stripe_here")
def test_a_bad_event_gets_stripes_error(server: str, tenants: Tenants) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe.billing.MeterEvent.create(
            event_name="api_requests", payload={"stripe_customer_id": "root", "value": "lots"}
        )
    assert caught.value.http_status == 400
    assert caught.value.param == "payload[value]"
    assert caught.value.json_body["error"]["type"] == "invalid_request_error"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe.billing.MeterEvent.create(
            event_name="api_requests", payload={"stripe_customer_id": "ghost", "value": "1"}
        )
    assert caught.value.param == "payload[stripe_customer_id]"
    assert "'ghost' does not exist" in str(caught.value.user_message)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe.billing.MeterEvent.create(
            event_name="api_requests",
            payload={"stripe_customer_id": "root", "value": "1"},
            timestamp=JAN_15 * 1000,  # milliseconds, where Stripe takes seconds
        )
    assert caught.value.param == "timestamp"
    assert "Unix seconds" in str(caught.value.user_message)
    assert native(server, tenants)["total"] == 0


def test_the_key_as_bearer_or_basic_auth_and_tenancy(server: str, tenants: Tenants) -> None:
    client = stripe.StripeClient(
        tenants.secrets["child"], base_addresses={"api": f"{server}/stripe"}, max_network_retries=0
    )
    client.v1.billing.meter_events.create(
        params={
            "event_name": "api_requests",
            "payload": {"stripe_customer_id": "child", "value": "3"},
        }
    )
    with pytest.raises(stripe.InvalidRequestError) as caught:  # the child sends only for itself
        client.v1.billing.meter_events.create(
            params={
                "event_name": "api_requests",
                "payload": {"stripe_customer_id": "root", "value": "3"},
            }
        )
    assert "may not send events for account 'root'" in str(caught.value.user_message)
    basic = httpx.post(
        f"{server}/stripe/v1/billing/meter_events",
        data={
            "event_name": "api_requests",
            "payload[stripe_customer_id]": "child",
            "payload[value]": "4",
            "timestamp": str(JAN_15),
        },
        auth=(tenants.secrets["child"], ""),
    )
    assert basic.status_code == 200, basic.text
    assert native(server, tenants)["total"] == 4  # the first was sent now, not in January
    wrong = stripe.StripeClient("sk_test_wrong", base_addresses={"api": f"{server}/stripe"})
    with pytest.raises(stripe.AuthenticationError) as refused:
        wrong.v1.billing.meter_events.create(
            params={"event_name": "x", "payload": {"stripe_customer_id": "root", "value": "1"}}
        )
    assert "sk_test_wrong" not in str(refused.value.json_body)


@pytest.mark.usefixtures("stripe_here")
def test_a_meter_event_is_at_once_in_the_seed_endpoints(server: str, tenants: Tenants) -> None:
    for identifier in ("r1", "r2", "r1"):
        stripe.billing.MeterEvent.create(
            event_name="requests",  # what GET /v1/account/usage/ counts
            payload={"stripe_customer_id": "child", "value": "1", "status": "200"},
            identifier=identifier,
            timestamp=JAN_15,
        )
    usage = httpx.get(
        f"{server}/v1/account/usage/",
        params={"start_date": "2025-01-01", "end_date": "2025-01-31"},
        headers={"X-Api-Key": tenants.secrets["child"]},
    )
    assert usage.status_code == 200, usage.text
    body = usage.json()
    assert body["usage_data"][0] == {"date": "2025-01-15", "request_count": 2}
    assert body["total_requests_in_timeperiod"] == 2


def test_the_v2_meter_event_stream(server: str, tenants: Tenants, operator_secret: str) -> None:
    bases = {"api": f"{server}/stripe", "meter_events": f"{server}/stripe"}
    client = stripe.StripeClient(operator_secret, base_addresses=bases, max_network_retries=0)
    session = client.v2.billing.meter_event_session.create()
    stream = stripe.StripeClient(
        session.authentication_token, base_addresses=bases, max_network_retries=0
    )
    events: list[Any] = [
        {
            "event_name": "api_requests",
            "identifier": f"v2-{i}",
            "timestamp": "2025-01-15T10:00:00Z",
            "payload": {"stripe_customer_id": "root", "value": str(i)},
        }
        for i in range(1, 5)
    ]
    stream.v2.billing.meter_event_stream.create(params={"events": events})
    stream.v2.billing.meter_event_stream.create(params={"events": events[:2]})  # repeats
    assert native(server, tenants)["total"] == 10
    bad = [*events, {**events[0], "identifier": "v2-x", "payload": {"value": "1"}}]
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stream.v2.billing.meter_event_stream.create(params={"events": bad})
    assert caught.value.param == "events[4].payload[stripe_customer_id]"
    assert native(server, tenants, aggregation="count")["total"] == 4  # nothing of it kept
    unnamed = {k: v for k, v in events[0].items() if k != "identifier"}
    for _ in range(2):  # one request and its retry: the same Idempotency-Key
        stream.v2.billing.meter_event_stream.create(
            params={"events": [unnamed]}, options={"idempotency_key": "stream-retry"}
        )
    assert native(server, tenants)["total"] == 11
