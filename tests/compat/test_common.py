"""The pieces the peers' APIs share: payload values as numbers and as dimension text."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import Tenants
from usagemeter.api.compat.common import as_number, scalar_text, unix_seconds

finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53)


@given(finite)
def test_a_number_survives_being_sent_as_text(value: float) -> None:
    text = scalar_text(value)
    assert text is not None
    assert as_number(text) == value
    assert as_number(value) == value


@given(st.none() | st.lists(st.integers()) | st.dictionaries(st.text(), st.integers()))
def test_what_is_not_a_scalar_is_neither_text_nor_number(value: object) -> None:
    assert scalar_text(value) is None
    assert as_number(value) is None


def test_text_that_is_no_finite_number() -> None:
    for text in ["lots", "", "nan", "inf", "-Infinity", "1e999"]:
        assert as_number(text) is None
    assert as_number(True) is None  # a boolean is no amount
    assert scalar_text(True) == "true"


@given(st.integers(946_684_800, 7_258_118_399))
def test_unix_seconds_in_range_are_milliseconds(seconds: int) -> None:
    assert unix_seconds(seconds, "t") == seconds * 1000
    assert unix_seconds(str(seconds), "t") == seconds * 1000


DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("path", "content_type", "shape"),
    [
        ("/openmeter/api/v1/events", "application/cloudevents-batch+json", "detail"),
        ("/openmeter/api/v1/meters/tokens_total/query", "application/json", "detail"),
        ("/lago/api/v1/events/batch", "application/json", "error_details"),
        ("/stripe/v2/billing/meter_event_stream", "application/json", "error"),
    ],
)
def test_json_nested_too_deep_is_a_400_in_the_peers_shape(
    server: str, tenants: Tenants, path: str, content_type: str, shape: str
) -> None:
    response = httpx.post(
        f"{server}{path}",
        content=DEEP,
        headers={**tenants.headers("root"), "content-type": content_type},
    )
    assert response.status_code == 400, response.text
    assert shape in response.json()
    assert "nested too deep" in response.text
