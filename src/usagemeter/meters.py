"""Meters: how each metric aggregates. The defaults make the seed endpoints work; a JSON file
can override them or add more."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from usagemeter.model import Aggregation, Meter
from usagemeter.peer_meters import PeerMeters

DEFAULT_METERS: tuple[Meter, ...] = (
    Meter("actions", Aggregation.COUNT),  # GET /analytics/detail-usage-time
    Meter("lookups", Aggregation.COUNT),  # GET /keys/{key}/usage
    Meter("requests", Aggregation.COUNT),  # GET /v1/account/usage/
    Meter("conversations", Aggregation.COUNT),  # GET /v1/accounts/{id}/analytics/usage
    Meter("ApiCalls", Aggregation.SUM),  # GET /v1/usage, and the rest of its metrics
    Meter("Events", Aggregation.SUM),
    Meter("BotAnalyses", Aggregation.SUM),
    Meter("Sessions", Aggregation.UNIQUE_COUNT, "session_id"),
    Meter("StorageBytes", Aggregation.LATEST),
)

# "unique_count(session_id)" names the counted dimension inline.
_UNIQUE = re.compile(r"^unique_count\(([A-Za-z0-9_.\-]{1,64})\)$")


def parse_aggregation(text: str) -> tuple[Aggregation, str | None]:
    """``sum``, ``count``, ``max``, ``min``, ``latest``, ``avg`` or
    ``unique_count(dimension)``."""
    match = _UNIQUE.match(text.strip())
    if match:
        return Aggregation.UNIQUE_COUNT, match.group(1)
    try:
        aggregation = Aggregation(text.strip())
    except ValueError:
        raise ValueError(
            f"unknown aggregation {text!r}: use sum, count, max, min, latest, avg"
            " or unique_count(<dimension>)"
        ) from None
    if aggregation is Aggregation.UNIQUE_COUNT:
        raise ValueError("unique_count needs its dimension, e.g. unique_count(session_id)")
    return aggregation, None


class MeterRegistry:
    """The meter of every metric; a metric nobody configured is summed."""

    def __init__(
        self, meters: Mapping[str, Meter] | None = None, peers: PeerMeters | None = None
    ) -> None:
        self._meters = dict(meters or {m.metric: m for m in DEFAULT_METERS})
        self.peers = peers or PeerMeters()  # OpenMeter's meters, Lago's billable metrics

    def get(self, metric: str) -> Meter:
        return self._meters.get(metric) or Meter(metric, Aggregation.SUM)

    def all(self) -> list[Meter]:
        return list(self._meters.values())

    @classmethod
    def from_file(cls, path: str | Path) -> MeterRegistry:
        """The defaults, overridden by ``{"meters": [{"metric": ..., "aggregation": ...}]}``;
        an entry may add ``"allow_negative": true|false`` (default: allowed except for
        count and unique_count)."""
        try:
            data: Any = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read meters file {path}: {exc}") from exc
        meters = {m.metric: m for m in DEFAULT_METERS}
        entries = data.get("meters") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f'meters file {path}: expected {{"meters": [...]}}')
        peers = PeerMeters()
        for i, entry in enumerate(entries):
            if isinstance(entry, dict) and PeerMeters.is_peer_entry(entry):
                try:
                    declared = peers.add(entry)
                except ValueError as exc:
                    raise ValueError(f"meters file {path}: entry {i}: {exc}") from exc
                if declared is not None:
                    meters[declared.metric] = declared
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("metric"), str):
                raise ValueError(f"meters file {path}: entry {i} needs a string 'metric'")
            try:
                aggregation, dimension = parse_aggregation(str(entry.get("aggregation", "sum")))
                dimension = entry.get("dimension", dimension)
                allow_negative = entry.get("allow_negative")
                if allow_negative is not None and not isinstance(allow_negative, bool):
                    raise ValueError("allow_negative: expected true or false")
                meters[entry["metric"]] = Meter(
                    entry["metric"], aggregation, dimension, allow_negative
                )
            except ValueError as exc:
                raise ValueError(f"meters file {path}: entry {i}: {exc}") from exc
        return cls(meters, peers)
