"""What a run measured: plain values that run.py fills and report.py renders."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from bench.questions import Question
from bench.timing import Timing

OURS = "usagemeter"


@dataclass
class Row:
    """One question, asked of every system."""

    question: Question
    cells: int = 0  # non-empty (bucket, group) cells in our answer
    timings: dict[str, Timing] = field(default_factory=dict)
    mismatches: dict[str, list[str]] = field(default_factory=dict)  # peer -> differences


@dataclass
class SeedRow:
    name: str
    label: str
    status: int | None = None
    timing: Timing | None = None
    note: str = ""


@dataclass
class Ingest:
    batch_size: int = 1000
    batch_clients: int = 4
    batch_events: int = 0
    batch_seconds: float = 0.0
    batch_duplicates: int = 0
    single_clients: int = 8
    single_requests: int = 0
    single_seconds: float = 0.0
    single_accepted: int = 0
    stored_checked: int = 0  # (account, metric) totals compared with what was sent
    stored_wrong: list[str] = field(default_factory=list)
    single_stored: float | None = None

    @property
    def batch_rate(self) -> float:
        return self.batch_events / self.batch_seconds if self.batch_seconds else 0.0

    @property
    def single_rate(self) -> float:
        return self.single_requests / self.single_seconds if self.single_seconds else 0.0


@dataclass
class ScalePoint:
    events: int
    timings: dict[str, Timing] = field(default_factory=dict)
    db_bytes: int = 0


@dataclass
class Results:
    started: dt.datetime
    command: str
    events: int
    seed: int
    anchor: dt.date
    warm_runs: int
    machine: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    accounts: dict[str, tuple[str, int]] = field(default_factory=dict)  # label -> (id, events)
    systems: list[str] = field(default_factory=lambda: [OURS])
    rows: list[Row] = field(default_factory=list)
    seeds: list[SeedRow] = field(default_factory=list)
    ingest: Ingest = field(default_factory=Ingest)
    scale: list[ScalePoint] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)  # phase -> peak RSS bytes
    loads: dict[str, float] = field(default_factory=dict)  # peer -> seconds to load
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
