"""The command line, on real database files."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from usagemeter import demo as demo_module
from usagemeter.cli import app

runner = CliRunner(env={"COLUMNS": "200"})  # rich tables wide enough to read


def run(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_bootstrap_accounts_and_keys(tmp_path: Path) -> None:
    db = str(tmp_path / "u.db")
    operator = json.loads(run("keys", "create", "--operator", "--db", db))
    assert operator["id"].startswith("key_") and operator["key"].startswith("um_")
    assert operator["scopes"] == ["operator"]
    run("accounts", "create", "Acme", "--id", "acme", "--anchor", "2024-01-31", "--db", db)
    run("accounts", "create", "Acme EU", "--id", "acme-eu", "--parent", "acme", "--db", db)
    key = json.loads(
        run(
            "keys",
            "create",
            "--account",
            "acme",
            "--prefix",
            "ak_",
            "--scope",
            "ingest",
            "--db",
            db,
        )
    )
    assert key["key"].startswith("ak_") and key["scopes"] == ["ingest"]
    listing = run("accounts", "list", "--db", db)
    assert "acme-eu" in listing and "month from 2024-01-31" in listing
    assert key["id"] in run("keys", "list", "--account", "acme", "--db", db)
    run("keys", "revoke", key["id"], "--db", db)

    bad = runner.invoke(app, ["accounts", "create", "X", "--parent", "ghost", "--db", db])
    assert bad.exit_code == 2 and "ghost" in bad.output
    both = runner.invoke(app, ["keys", "create", "--db", db])
    assert both.exit_code == 2


def test_ingest_is_resumable_and_export_round_trips(tmp_path: Path) -> None:
    db = str(tmp_path / "u.db")
    run("accounts", "create", "Acme", "--id", "acme", "--db", db)
    events = tmp_path / "events.ndjson"
    events.write_text(
        "\n".join(
            json.dumps(
                {
                    "account": "acme",
                    "metric": "lookups",
                    "ts": f"2025-01-0{1 + i % 5}T10:00:00Z",
                    "tags": ["a"] if i % 2 else [],
                    "dimensions": {"agent": f"x{i % 3}"},
                }
            )
            for i in range(25)
        )
        + "\n"
    )
    first = json.loads(run("ingest", str(events), "--batch", "10", "--db", db))
    assert first == {"records": 25, "accepted": 25, "duplicates": 0}
    again = json.loads(run("ingest", str(events), "--db", db))
    assert again == {"records": 25, "accepted": 0, "duplicates": 25}

    table = run(
        "query", "lookups", "acme", "--start", "2025-01-01", "--end", "2025-01-06", "--db", db
    )
    assert "total: 25" in table

    exported = tmp_path / "out.csv"
    run("export", "--format", "csv", "--output", str(exported), "--db", db)
    db2 = str(tmp_path / "copy.db")
    run("accounts", "create", "Acme", "--id", "acme", "--db", db2)
    copied = json.loads(run("ingest", str(exported), "--db", db2))
    assert copied == {"records": 25, "accepted": 25, "duplicates": 0}
    grouped = run(
        "query",
        "lookups",
        "acme",
        "--start",
        "2025-01-01",
        "--end",
        "2025-01-06",
        "--group-by",
        "agent",
        "--tags",
        "a",
        "--granularity",
        "total",
        "--db",
        db2,
    )
    assert "total: 12" in grouped

    ndjson = run("export", "--account", "acme", "--db", db)
    lines = [json.loads(line) for line in ndjson.splitlines()]
    assert len(lines) == 25 and {e["account"] for e in lines} == {"acme"}


def test_ingest_reports_bad_records_and_stores_nothing_of_their_batch(tmp_path: Path) -> None:
    db = str(tmp_path / "u.db")
    run("accounts", "create", "Acme", "--id", "acme", "--db", db)
    events = tmp_path / "bad.csv"
    events.write_text(
        "id,account,metric,ts,value\n1,acme,m,2025-01-01T00:00:00Z,1\n2,acme,m,never,1\n"
    )
    result = runner.invoke(app, ["ingest", str(events), "--db", db])
    assert result.exit_code == 2
    assert "bad.csv:3: column 4 (ts): ts:" in result.output
    assert "total: 0" in run(
        "query", "m", "acme", "--start", "2025-01-01", "--end", "2025-01-02", "--db", db
    )


def test_ingest_stores_every_chunk_before_a_rejected_one_and_says_how_many(
    tmp_path: Path,
) -> None:
    # Chunks of 3 are stored while the next is checked: the one refused (line 8, a NaN value
    # that only json's dialect reads) must find the two before it stored, and say so.
    db = str(tmp_path / "u.db")
    run("accounts", "create", "Acme", "--id", "acme", "--db", db)
    lines = [
        json.dumps({"id": f"e{i}", "account": "acme", "metric": "m", "ts": 1735689600000 + i})
        for i in range(9)
    ]
    lines[7] = lines[7].replace('"ts"', '"value": NaN, "ts"')
    events = tmp_path / "events.ndjson"
    events.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["ingest", str(events), "--batch", "3", "--db", db])
    assert result.exit_code == 2
    assert "events.ndjson:8" in result.output and "value" in result.output
    assert "6 events stored before it" in " ".join(result.output.split())
    assert "total: 6" in run(
        "query", "m", "acme", "--start", "2025-01-01", "--end", "2025-01-02", "--db", db
    )


def test_demo_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run twice at the same moment, the demo adds nothing the second time (run later, it
    adds the usage that has happened since)."""
    moment = datetime.now(UTC)

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Frozen:
            return cls.fromtimestamp(moment.timestamp(), tz)

    monkeypatch.setattr(demo_module, "datetime", Frozen)
    db = str(tmp_path / "demo.db")
    first = json.loads(run("demo", "--db", db))
    assert first["events_added"] > 10_000
    assert first["keys"]["key_demo_operator"] == "demo_operator_secret"
    assert json.loads(run("demo", "--db", db))["events_added"] == 0


def test_ingest_takes_events_with_a_type_dimension_in_whole_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conversations carry a "type" dimension; their blocks are clean events, not account or
    key records, and go the compiled way (they went line by line, at a third of the rate)."""
    from usagemeter import cli

    lines_taken: list[int] = []
    line_by_line = cli.ndjson_record

    def counted(path: Path, number: int, line: bytes) -> Any:
        lines_taken.append(number)
        return line_by_line(path, number, line)

    monkeypatch.setattr(cli, "ndjson_record", counted)
    db = str(tmp_path / "u.db")
    events = tmp_path / "conversations.ndjson"
    records = [{"type": "account", "id": "acme", "name": "Acme"}] + [
        {
            "id": f"c{i}",
            "account": "acme",
            "metric": "conversations",
            "ts": 1735732800000 + i,
            "value": 30,
            "dimensions": {"agent": "a1", "type": "inbound"},
        }
        for i in range(12)
    ]
    events.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    result = json.loads(run("ingest", str(events), "--batch", "4", "--db", db))
    assert result == {"records": 13, "accepted": 12, "duplicates": 0, "accounts": 1, "keys": 0}
    assert lines_taken == [1, 2, 3, 4]  # the block with the account record, and only it


def test_ingest_takes_clean_blocks_whole_and_the_others_line_by_line(tmp_path: Path) -> None:
    """A file mixing blocks the compiled path decodes whole (events with ids) with blocks
    it cannot (an account record, lines without ids, blank lines) stores every event once,
    in file order, and a rerun finds every one already stored."""
    db = str(tmp_path / "u.db")
    lines: list[str] = []
    for i in range(40):
        if i == 7:
            lines.append(json.dumps({"type": "account", "id": "late", "name": "Late"}))
        if i == 20:
            lines.append("")
        event: dict[str, Any] = {
            "account": "acme" if i < 10 else "late" if i % 2 else "acme",
            "metric": "m",
            "ts": 1735732800000 + i,  # 2025-01-01T12:00:00Z
            "value": i,
        }
        if not 25 <= i < 30:  # a block of events with no id: theirs derived from the line
            event["id"] = f"e{i}"
        lines.append(json.dumps(event))
    events = tmp_path / "mixed.ndjson"
    events.write_text(json.dumps({"type": "account", "id": "acme", "name": "Acme"}) + "\n")
    with events.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    first = json.loads(run("ingest", str(events), "--batch", "4", "--db", db))
    assert first == {"records": 42, "accepted": 40, "duplicates": 0, "accounts": 2, "keys": 0}
    again = json.loads(run("ingest", str(events), "--batch", "4", "--db", db))
    assert (again["accepted"], again["duplicates"]) == (0, 40)
    day = ("--start", "2025-01-01", "--end", "2025-01-02", "--granularity", "total")
    expected = {
        "acme": sum(i for i in range(40) if i < 10 or i % 2 == 0),
        "late": sum(i for i in range(10, 40) if i % 2),
    }
    for account, total in expected.items():
        answer = run("query", "m", account, *day, "--json", "--db", db)
        assert json.loads(answer)["total"] == total, answer
