"""The pieces the peers' APIs share: payload values as numbers and as dimension text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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
