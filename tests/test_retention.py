"""Retention on every store: raw events older than the horizon go, their rollups stay, so
count, sum, min, max and latest stay exact over quarter-hour ranges; what needs raw events is
refused with a clear error, never answered wrong."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.conftest import Tenants, event
from usagemeter import config
from usagemeter.cli import app
from usagemeter.corrections import RawDropped, VoidSelector
from usagemeter.model import Account, AppendResult, Event
from usagemeter.store.base import AggregateSpec, Conflict, Measure, Store, Window
from usagemeter.store.retention import RetentionJob, check_raw, cutoff

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
MIN_MS = 60_000
HOUR_MS = 60 * MIN_MS
DAY_MS = 24 * HOUR_MS
HORIZON = BASE_MS + 90 * DAY_MS
EXACT = (Measure("count"), Measure("sum"), Measure("min"), Measure("max"), Measure("latest"))


def _events() -> list[Event]:
    """120 days of a few thousand events at ragged times, with a grouping dimension."""
    rng = random.Random(18)
    return [
        Event(
            f"e{i}",
            "a",
            "m",
            BASE_MS + rng.randrange(120 * DAY_MS),
            float(rng.randrange(-50, 500)),
            dimensions={"agent": rng.choice(["bot", "human"]), "s": str(rng.randrange(40))},
        )
        for i in range(3000)
    ]


def _reports(store: Store) -> list[Any]:
    days = tuple(Window(d, BASE_MS + d * DAY_MS, BASE_MS + (d + 1) * DAY_MS) for d in range(120))
    quarters = (
        Window(0, BASE_MS + 15 * MIN_MS, BASE_MS + 100 * DAY_MS + 45 * MIN_MS),
        Window(1, BASE_MS + 3 * HOUR_MS, BASE_MS + 5 * DAY_MS + 30 * MIN_MS),
    )
    out = []
    for windows in (days, quarters):
        for group_by in ((), ("agent",)):
            rows = store.aggregate(AggregateSpec(("a",), "m", windows, EXACT, group_by))
            out.append(sorted((r.window, r.group, r.values) for r in rows))
    return out


def test_a_store_of_120_days_keeps_exact_rollups_after_retention(store: Store) -> None:
    store.create_account(Account("a", "A"))
    events = _events()
    for i in range(0, len(events), 500):
        store.append(events[i : i + 500])
    before = _reports(store)
    old = [e for e in events if e.ts_ms < HORIZON]
    assert store.retain(HORIZON) == len(old)
    assert store.raw_horizon() == HORIZON
    assert store.count_events() == len(events) - len(old)
    assert _reports(store) == before
    # The ids of dropped events stay taken: a late retry is a duplicate.
    assert store.append(old[:5]) == AppendResult(0, 5)

    # What needs raw events before the horizon is refused, and says why.
    distinct = AggregateSpec(
        ("a",), "m", (Window(0, BASE_MS, BASE_MS + 120 * DAY_MS),), (Measure("unique_count", "s"),)
    )
    ragged = AggregateSpec(("a",), "m", (Window(0, BASE_MS + 7 * MIN_MS, HORIZON),), EXACT)
    for spec in (distinct, ragged):
        with pytest.raises(RawDropped, match="retention"):
            check_raw(spec, store.raw_horizon())
    # From the horizon on, both are answered from the raw events still kept.
    check_raw(
        AggregateSpec(
            ("a",),
            "m",
            (Window(0, HORIZON + 7 * MIN_MS, HORIZON + DAY_MS),),
            (Measure("unique_count", "s"),),
        ),
        store.raw_horizon(),
    )
    with pytest.raises(RawDropped, match="retention"):
        store.void_events(
            VoidSelector("a", metric="m", start_ms=BASE_MS, end_ms=HORIZON), "r", None, HORIZON
        )
    with pytest.raises(Conflict, match="dropped by retention"):
        store.void_events(VoidSelector("a", ids=(old[0].id,)), "r", None, HORIZON)
    # A void after the horizon still recomputes exactly from the raw events kept.
    young = next(e for e in events if e.ts_ms >= HORIZON + DAY_MS)
    store.void_events(VoidSelector("a", ids=(young.id,)), "r", None, HORIZON)
    store.compact()
    after = _reports(store)
    assert after[0] != before[0]
    assert sum(v[0] or 0 for _, _, v in after[0]) == len(events) - 1
    # The horizon only moves forward.
    store.retain(HORIZON - 10 * DAY_MS)
    assert store.raw_horizon() == HORIZON


def test_a_query_needing_dropped_raw_events_is_a_409_over_http(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any, store: Store
) -> None:
    send(
        event("a", "other", "m", "2025-01-01T10:07:00Z", value=3),
        event("b", "other", "m", "2025-03-01T10:07:00Z", value=4),
    )
    store.retain(BASE_MS + 30 * DAY_MS)
    base = {"account": "other", "metric": "m", "granularity": "total"}
    whole = client.get(
        "/v1/query", params={**base, "start": "2025-01-01", "end": "2025-04-01"}, headers=op
    )
    assert whole.status_code == 200 and whole.json()["total"] == 7
    ragged = client.get(
        "/v1/query",
        params={**base, "start": "2025-01-01T10:05:00Z", "end": "2025-04-01"},
        headers=op,
    )
    assert ragged.status_code == 409
    assert ragged.json()["error"]["code"] == "raw_events_dropped"
    assert "15-minute" in ragged.json()["error"]["message"]


def test_serve_retention_is_a_setting_and_a_job(tmp_path: Path, db_path: Path) -> None:
    from usagemeter.store.sqlite import SQLiteStore

    store = SQLiteStore(db_path)
    store.create_account(Account("a", "A"))
    now = BASE_MS + 40 * DAY_MS
    store.append([Event("old", "a", "m", BASE_MS), Event("new", "a", "m", now - DAY_MS)])
    job = RetentionJob(store, 30, lambda: now)
    assert job.run_once() == 1 and store.raw_horizon() == cutoff(now, 30)
    store.close()
    with pytest.raises(ValueError, match="at least 1 day"):
        cutoff(now, 0)
    toml = tmp_path / "u.toml"
    toml.write_text("retain-raw-days = 30\n")
    import typer

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    settings = {flag: (value, source) for flag, value, source in config.effective(serve, str(toml))}
    assert settings["--retain-raw-days"] == (30, "config file")
    result = CliRunner().invoke(app, ["retain", "--days", "1", "--db", str(db_path)])
    assert result.exit_code == 0, result.output
    assert '"dropped": 1' in result.stdout  # "new" is older than a day by the real clock


def test_rollups_rebuilt_after_retention_still_count_the_dropped_events(tmp_path: Path) -> None:
    """A file whose rollups are folded again (an upgrade of its schema) keeps the counts of
    events retention dropped: their payloads are kept with their ids."""
    from usagemeter.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "usage.db")
    store.create_account(Account("a", "A"))
    events = _events()
    store.append(events)
    before = _reports(store)
    store.retain(HORIZON)
    store.rebuild_rollups()
    assert _reports(store) == before
    store.close()
