"""The peers' meters in a meters file: OpenMeter's meters and Lago's billable metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.compat.conftest import METERS
from usagemeter.meters import MeterRegistry
from usagemeter.model import Aggregation, Meter
from usagemeter.peer_meters import MISSING, extract, parse_path


def load(tmp_path: Path, *entries: dict[str, Any]) -> MeterRegistry:
    path = tmp_path / "meters.json"
    path.write_text(json.dumps({"meters": list(entries)}))
    return MeterRegistry.from_file(path)


def test_peer_meters_declare_native_meters(tmp_path: Path) -> None:
    meters = load(tmp_path, *METERS["meters"], {"metric": "tokens", "aggregation": "max"})
    # An event type's first OpenMeter meter is its native default; the rest are queried by slug.
    assert meters.get("prompt") == Meter("prompt", Aggregation.SUM)
    assert meters.get("storage") == Meter("storage", Aggregation.SUM)
    assert meters.get("api_calls") == Meter("api_calls", Aggregation.COUNT)
    assert meters.get("tokens").aggregation is Aggregation.MAX  # native entries still work
    assert meters.get("Sessions").aggregation is Aggregation.UNIQUE_COUNT  # defaults remain
    peers = meters.peers
    assert [m.slug for m in peers.of_type("prompt")] == [
        "tokens_total",
        "tokens_avg",
        "tokens_max",
        "prompts",
        "users",
    ]
    assert peers.openmeter["users"].dimension == "user.id"
    assert peers.openmeter["prompts"].value_property is None
    assert peers.field_names == {"storage": "gb"}


def test_lago_unique_count_counts_its_field(tmp_path: Path) -> None:
    meters = load(
        tmp_path, {"code": "seats", "aggregation_type": "unique_count_agg", "field_name": "user"}
    )
    assert meters.get("seats") == Meter("seats", Aggregation.UNIQUE_COUNT, "user")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"slug": "s", "eventType": "e", "aggregation": "SUM"}, "valueProperty: required"),
        ({"slug": "s", "eventType": "e", "aggregation": "P99"}, "aggregation: use one of"),
        ({"slug": "S!", "eventType": "e", "aggregation": "COUNT"}, "slug:"),
        ({"slug": "s", "aggregation": "COUNT"}, "eventType: required"),
        (
            {"slug": "s", "eventType": "e", "aggregation": "SUM", "valueProperty": "tokens"},
            "expected a JSONPath",
        ),
        (
            {"slug": "s", "eventType": "e", "aggregation": "COUNT", "groupBy": {"m": "$..m"}},
            "not a supported JSONPath",
        ),
        (
            {"slug": "s", "eventType": "e", "aggregation": "COUNT", "groupBy": {"subject": "$.s"}},
            "groupBy:",
        ),
        (
            {"slug": "s", "eventType": "e", "aggregation": "COUNT", "groupBy": {"key": "$.k"}},
            "groupBy:",
        ),
        (
            {
                "slug": "s",
                "eventType": "e",
                "aggregation": "UNIQUE_COUNT",
                "valueProperty": "$.key",
            },
            "valueProperty:",
        ),
        ({"code": "c", "aggregation_type": "sum_agg", "field_name": "subaccount"}, "field_name:"),
        ({"code": "c", "aggregation_type": "weighted_sum_agg", "field_name": "f"}, "not supported"),
        ({"code": "c", "aggregation_type": "sum_agg"}, "field_name: required"),
    ],
)
def test_bad_entries_say_what_to_fix(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="entry 0: ") as caught:
        load(tmp_path, entry)
    assert message in str(caught.value)


def test_meters_of_one_type_read_one_value(tmp_path: Path) -> None:
    def meter(slug: str, aggregation: str, path: str) -> dict[str, Any]:
        return {"slug": slug, "eventType": "e", "aggregation": aggregation, "valueProperty": path}

    with pytest.raises(ValueError, match="entry 1: valueProperty: meters 'a' and 'b'"):
        load(tmp_path, meter("a", "SUM", "$.in"), meter("b", "MAX", "$.out"))
    with pytest.raises(ValueError, match="declared twice"):
        load(tmp_path, meter("a", "SUM", "$.in"), meter("a", "MAX", "$.in"))
    # A unique count reads a dimension, not the value: it may name another property.
    fine = load(tmp_path, meter("a", "SUM", "$.in"), meter("b", "UNIQUE_COUNT", "$.user"))
    assert fine.peers.openmeter["b"].dimension == "user"


@pytest.mark.parametrize(
    ("text", "path"),
    [("$.a", ("a",)), ("$.a.b_c", ("a", "b_c")), ("$['a b'].c", ("a b", "c")), ('$["x"]', ("x",))],
)
def test_jsonpaths(text: str, path: tuple[str, ...]) -> None:
    assert parse_path(text, "valueProperty") == path


@pytest.mark.parametrize("text", ["a.b", "$", "$..a", "$.a[0]", "$.a.", "$.*", None])
def test_unsupported_jsonpaths(text: str | None) -> None:
    with pytest.raises(ValueError, match="valueProperty"):
        parse_path(text, "valueProperty")


names = st.text(st.characters(codec="ascii", exclude_characters="'\"[]"), min_size=1, max_size=8)


@given(keys=st.lists(names, min_size=1, max_size=4), leaf=st.integers() | st.text(max_size=5))
def test_extract_finds_what_the_path_names(keys: list[str], leaf: object) -> None:
    data: object = leaf
    for key in reversed(keys):
        data = {key: data, "[sibling]": None}  # names exclude brackets: never a key
    text = "$" + "".join(f"['{k}']" for k in keys)
    assert extract(data, parse_path(text, "p")) == leaf
    assert extract(data, (*parse_path(text, "p"), "deeper")) is MISSING


def test_the_readme_meters_file_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Coming from OpenMeter / Lago / Stripe", 1)[1]
    block = section.split("```json\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "meters.json"
    path.write_text(block)
    meters = MeterRegistry.from_file(path)
    assert set(meters.peers.openmeter) == {"tokens_total", "tokens_avg"}
    assert meters.peers.field_names == {"storage": "gb"}
