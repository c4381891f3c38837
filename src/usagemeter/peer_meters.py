"""The peers' meter definitions, as they appear in a meters file: OpenMeter's meters and Lago's
billable metrics. Each maps onto a native meter (its metric is the peer's event type or code)
and tells the compatible APIs how to read an event's value and dimensions from the peer's
payload (OpenMeter's ``data``, Lago's ``properties``).

An OpenMeter meter, as OpenMeter itself declares it::

    {"slug": "tokens_total", "eventType": "prompt", "aggregation": "SUM",
     "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}}

A Lago billable metric, by its code and the property holding the value::

    {"code": "storage", "aggregation_type": "sum_agg", "field_name": "gb"}

usagemeter keeps one value per event, so the meters of one event type that read a value must
read the same ``valueProperty`` (COUNT reads none; UNIQUE_COUNT counts its property as a
dimension, not a value).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from usagemeter.model import Aggregation, Meter

# $.a.b, $['a b'] or $["a"]: the JSONPath that OpenMeter's meters use to name a property.
_SEGMENT = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_\-]*)|\[(?:'([^'\]]+)'|"([^"\]]+)")\]""")

OPENMETER_AGGREGATIONS = {
    "SUM": Aggregation.SUM,
    "COUNT": Aggregation.COUNT,
    "UNIQUE_COUNT": Aggregation.UNIQUE_COUNT,
    "AVG": Aggregation.AVG,
    "MIN": Aggregation.MIN,
    "MAX": Aggregation.MAX,
    "LATEST": Aggregation.LATEST,
}
LAGO_AGGREGATIONS = {
    "count_agg": Aggregation.COUNT,
    "sum_agg": Aggregation.SUM,
    "max_agg": Aggregation.MAX,
    "unique_count_agg": Aggregation.UNIQUE_COUNT,
    "latest_agg": Aggregation.LATEST,
}
# Aggregations that read the event's value (COUNT counts events; UNIQUE_COUNT a dimension).
_VALUED = frozenset(
    {Aggregation.SUM, Aggregation.AVG, Aggregation.MIN, Aggregation.MAX, Aggregation.LATEST}
)

MISSING = object()


def parse_path(text: object, what: str) -> tuple[str, ...]:
    """A JSONPath such as ``$.usage.tokens`` -> ("usage", "tokens")."""
    if not isinstance(text, str) or not text.startswith("$"):
        raise ValueError(f"{what}: expected a JSONPath such as $.tokens, got {text!r}")
    parts = _segments(text)
    if parts is None:
        raise ValueError(
            f"{what}: {text!r} is not a supported JSONPath: use $.name, $.a.b or $['a b']"
        )
    if not parts:
        raise ValueError(f"{what}: {text!r} names no property; e.g. $.tokens")
    return parts


@lru_cache(maxsize=1024)  # ingest reads the same few paths for every event
def _segments(text: str) -> tuple[str, ...] | None:
    parts: list[str] = []
    pos = 1
    while pos < len(text):
        match = _SEGMENT.match(text, pos)
        if match is None:
            return None
        parts.append(next(g for g in match.groups() if g is not None))
        pos = match.end()
    return tuple(parts)


def extract(data: object, path: tuple[str, ...]) -> object:
    """The value at ``path`` inside ``data``, or MISSING."""
    for part in path:
        if not isinstance(data, Mapping) or part not in data:
            return MISSING
        data = data[part]
    return data


@dataclass(frozen=True, slots=True)
class OpenMeterMeter:
    """One OpenMeter meter: its slug, the event type it reads and how."""

    slug: str
    event_type: str
    aggregation: Aggregation
    value_property: str | None = None
    group_by: Mapping[str, str] = field(default_factory=dict)  # name -> JSONPath
    name: str | None = None
    description: str | None = None

    @property
    def value_path(self) -> tuple[str, ...] | None:
        if self.value_property is None:
            return None
        return parse_path(self.value_property, "valueProperty")

    @property
    def dimension(self) -> str | None:
        """The dimension a UNIQUE_COUNT meter counts: its property's path, dotted."""
        path = self.value_path
        if self.aggregation is not Aggregation.UNIQUE_COUNT or path is None:
            return None
        return ".".join(path)

    @property
    def reads_value(self) -> bool:
        return self.aggregation in _VALUED

    def native(self) -> Meter:
        return Meter(self.event_type, self.aggregation, self.dimension)

    def as_json(self) -> dict[str, Any]:
        """As OpenMeter's API shows a meter (its id is the slug: meters live in a file)."""
        return {
            "id": self.slug,
            "slug": self.slug,
            "name": self.name or self.slug,
            "description": self.description,
            "aggregation": next(
                k for k, v in OPENMETER_AGGREGATIONS.items() if v is self.aggregation
            ),
            "eventType": self.event_type,
            "valueProperty": self.value_property,
            "groupBy": dict(self.group_by),
        }


def _ingest_rules() -> tuple[re.Pattern[str], re.Pattern[str], frozenset[str]]:
    """Ingest's rules for metric and dimension names, and its reserved dimensions. Imported
    when a file is read, not with this module: ingest depends on the meters (a metric's meter
    decides what values it takes), and the meters on this module."""
    from usagemeter import ingest

    return ingest.NAME, ingest.DIMENSION, ingest.RESERVED_DIMENSIONS


def _metric_name(name: object) -> bool:
    return isinstance(name, str) and bool(_ingest_rules()[0].match(name))


def _dimension_name(name: object) -> bool:
    _, dimension, reserved = _ingest_rules()
    return isinstance(name, str) and bool(dimension.match(name)) and name not in reserved


def _reserved() -> str:
    return ", ".join(sorted(_ingest_rules()[2]))


def _openmeter_meter(entry: Mapping[str, Any]) -> OpenMeterMeter:
    slug, event_type = entry.get("slug"), entry.get("eventType")
    if not isinstance(slug, str) or not re.fullmatch(r"[a-z0-9_\-]{1,63}", slug):
        raise ValueError("slug: 1-63 lower-case letters, digits, '_' or '-'")
    if not isinstance(event_type, str) or not _metric_name(event_type):
        raise ValueError("eventType: required, 1-100 letters, digits, _ . : -")
    text = str(entry.get("aggregation", "")).upper()
    if text not in OPENMETER_AGGREGATIONS:
        raise ValueError(f"aggregation: use one of {', '.join(OPENMETER_AGGREGATIONS)}")
    aggregation = OPENMETER_AGGREGATIONS[text]
    value_property = entry.get("valueProperty")
    if aggregation is Aggregation.COUNT:
        value_property = None  # as OpenMeter: a COUNT meter counts events, whatever they carry
    elif value_property is None:
        raise ValueError(f"valueProperty: required for {text}, e.g. $.tokens")
    group_by = entry.get("groupBy") or {}
    if not isinstance(group_by, Mapping):
        raise ValueError(
            'groupBy: expected an object of name -> JSONPath, e.g. {"model": "$.model"}'
        )
    for name, path in group_by.items():
        if not _dimension_name(name) or name == "subject":
            raise ValueError(
                f"groupBy: {name!r} must be 1-64 letters, digits, _ . - and not one of"
                f" subject, {_reserved()}"
            )
        parse_path(path, f"groupBy.{name}")
    meter = OpenMeterMeter(
        slug=slug,
        event_type=event_type,
        aggregation=aggregation,
        value_property=value_property,
        group_by=dict(group_by),
        name=entry.get("name"),
        description=entry.get("description"),
    )
    dimension = meter.dimension
    if dimension is not None and not _dimension_name(dimension):
        raise ValueError(
            f"valueProperty: {value_property!r} must name a property of 1-64 letters, digits,"
            f" _ . - other than {_reserved()}"
        )
    return meter


@dataclass
class PeerMeters:
    """Every peer meter of one meters file."""

    openmeter: dict[str, OpenMeterMeter] = field(default_factory=dict)  # by slug
    # Lago: the property holding each metric's value (or the counted one, for unique_count).
    field_names: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def is_peer_entry(entry: Mapping[str, Any]) -> bool:
        return "slug" in entry or "field_name" in entry or "code" in entry

    def of_type(self, event_type: str) -> list[OpenMeterMeter]:
        return [m for m in self.openmeter.values() if m.event_type == event_type]

    def add(self, entry: Mapping[str, Any]) -> Meter | None:
        """Take one file entry; return the native meter it declares for its metric, or None
        when an earlier OpenMeter meter of the same event type already declared one."""
        if "slug" in entry:
            return self._add_openmeter(_openmeter_meter(entry))
        return self._add_lago(entry)

    def _add_openmeter(self, meter: OpenMeterMeter) -> Meter | None:
        if meter.slug in self.openmeter:
            raise ValueError(f"slug: {meter.slug!r} is declared twice")
        siblings = self.of_type(meter.event_type)
        for other in siblings:
            valued = meter.reads_value and other.reads_value
            if valued and other.value_property != meter.value_property:
                raise ValueError(
                    f"valueProperty: meters {other.slug!r} and {meter.slug!r} of event type"
                    f" {meter.event_type!r} read {other.value_property} and"
                    f" {meter.value_property}; usagemeter keeps one value per event, so"
                    " give them one valueProperty or send two event types"
                )
        self.openmeter[meter.slug] = meter
        return None if siblings else meter.native()

    def _add_lago(self, entry: Mapping[str, Any]) -> Meter:
        metric = entry.get("metric", entry.get("code"))
        if not isinstance(metric, str) or not _metric_name(metric):
            raise ValueError("code: required, the billable metric's code (1-100 letters)")
        field_name = entry.get("field_name")
        if field_name is not None and not _dimension_name(field_name):
            raise ValueError("field_name: the property holding the value, 1-64 letters")
        text = str(entry.get("aggregation_type", entry.get("aggregation", "count_agg")))
        aggregation = LAGO_AGGREGATIONS.get(text)
        if aggregation is None:
            try:
                aggregation = Aggregation(text)
            except ValueError:
                raise ValueError(
                    f"aggregation_type: {text!r} is not supported; use"
                    f" {', '.join(LAGO_AGGREGATIONS)}"
                ) from None
        if aggregation is not Aggregation.COUNT and field_name is None:
            raise ValueError(f"field_name: required for {text}: the property holding the value")
        if field_name is not None and aggregation is not Aggregation.COUNT:
            self.field_names[metric] = field_name
        dimension = field_name if aggregation is Aggregation.UNIQUE_COUNT else None
        return Meter(metric, aggregation, dimension)
