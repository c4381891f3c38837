"""The table renders every section and judges the targets from the figures."""

import datetime as dt

from bench import questions as qs
from bench.report import render, targets
from bench.results import OURS, Results, Row, ScalePoint, SeedRow
from bench.timing import Timing


def _results() -> Results:
    anchor = dt.date(2026, 11, 24)
    r = Results(dt.datetime(2026, 11, 24, tzinfo=dt.UTC), "python -m bench.run", 10, 1, anchor, 7)
    r.systems = [OURS, "PostgreSQL", "chDB"]
    fast, slow = Timing(0.004, [0.002] * 7), Timing(0.2, [0.1] * 7)
    timings = {OURS: fast, "PostgreSQL": slow, "chDB": Timing(0.01, [0.01])}
    r.scale = [ScalePoint(1, dict(timings)), ScalePoint(10, dict(timings))]
    r.rows = [Row(q, 90, dict(timings)) for q in qs.question_set(anchor, 0, "typical")]
    r.rows[0].mismatches = {"chDB": ["bucket ...: ours 1, theirs 2"]}
    r.seeds = [SeedRow("000 GET /x", "typical", 200, Timing(0.006, [0.006]))]
    r.ingest.batch_events, r.ingest.batch_seconds = 1_000_000, 5.0
    r.memory = {"ingest": 300 * 1024 * 1024}
    return r


def test_targets_are_judged_from_the_figures() -> None:
    got = {name: met for name, _, met in targets(_results())}
    assert got["heavy 90-day daily report, HTTP warm < 10 ms"] == "met"
    assert got["same, >= 25x faster than PostgreSQL"] == "met"
    assert got["same, faster than chDB"] == "met"
    assert got["typical account, any question or seed endpoint, HTTP warm < 5 ms"] != "met"
    assert got["ingest, batches of 1000: >= 100,000 events/s"] == "met"
    assert got["server peak RSS < 200 MB"] != "met"


def test_render_has_every_section() -> None:
    text = render(_results())
    for heading in ("## Targets", "## Questions", "## Seed endpoints", "## Ingest", "## Scale"):
        assert heading in text
    assert "**NO: chDB**" in text
