"""Issue 11.3, 11.4, 11.12, 11.13: what the command line prints, and how it reads flags."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from usagemeter.cli import app

wide = CliRunner(env={"COLUMNS": "200"})
narrow = CliRunner(env={"COLUMNS": "80"})


def run(*args: str, runner: CliRunner = wide) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_numbers_print_exactly_with_separators_and_as_json(tmp_path: Path) -> None:
    db = str(tmp_path / "u.db")
    run("accounts", "create", "New Co", "--id", "newco", "--db", db)
    events = tmp_path / "e.ndjson"
    lines = [
        {
            "id": "a",
            "account": "newco",
            "metric": "ApiCalls",
            "ts": "2025-01-01T10:00:00Z",
            "value": 1_278_953,
        },
        {
            "id": "b",
            "account": "newco",
            "metric": "ApiCalls",
            "ts": "2025-01-02T10:00:00Z",
            "value": 1.5,
        },
    ]
    events.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run("ingest", str(events), "--db", db)
    args = ("query", "ApiCalls", "newco", "--start", "2025-01-01", "--end", "2025-01-03")
    table = run(*args, "--granularity", "total", "--db", db)
    assert "1,278,954.5" in table and "total: 1,278,954.5" in table
    assert "e+06" not in table
    daily = run(*args, "--db", db)
    assert "│ 1,278,953 │" in daily and " 1.5 │" in daily
    answer = json.loads(run(*args, "--json", "--db", db))
    assert answer["total"] == 1_278_954.5
    assert [b["groups"][0]["value"] for b in answer["buckets"]] == [1_278_953, 1.5]


def test_csv_errors_name_the_file_line_and_column(tmp_path: Path) -> None:
    db = str(tmp_path / "u.db")
    run("accounts", "create", "Acme", "--id", "acme", "--db", db)
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "id,account,metric,ts,value\n"
        "1,acme,m,2025-01-01T00:00:00Z,1\n"
        '"2\nwith a newline",acme,m,2025-01-01T00:00:00Z,2\n'
        "3,acme,m,2025-01-01T00:00:00Z,abc\n"
    )
    result = wide.invoke(app, ["ingest", str(bad), "--db", db])
    assert result.exit_code == 2
    assert not isinstance(result.exception, ValueError)  # an error message, not a traceback
    assert f"{bad}:5: column 5 (value): 'abc' is not a number" in result.output
    flag = tmp_path / "flag.csv"
    flag.write_text("id,account,metric,ts,billable\n1,acme,m,2025-01-01T00:00:00Z,maybe\n")
    result = wide.invoke(app, ["ingest", str(flag), "--db", db])
    assert result.exit_code == 2 and "flag.csv:2: column 5 (billable)" in result.output


def test_ids_are_never_truncated_and_listings_have_json(tmp_path: Path) -> None:
    db = str(tmp_path / "u.db")
    long_account = "account-with-a-rather-long-identifier-0001"
    run(
        "accounts", "create", "A name that is long enough to wrap", "--id", long_account, "--db", db
    )
    created = [
        json.loads(
            run(
                "keys",
                "create",
                "--account",
                long_account,
                "--name",
                "a key with a long descriptive name",
                "--db",
                db,
            )
        )
        for _ in range(3)
    ]
    listing = run("keys", "list", "--account", long_account, "--db", db, runner=narrow)
    for key in created:
        assert key["id"] in listing
    accounts_listing = run("accounts", "list", "--db", db, runner=narrow)
    assert long_account in accounts_listing
    # Other cells fold onto more lines: nothing is cut short.
    assert "…" not in listing and "…" not in accounts_listing
    as_json = json.loads(run("keys", "list", "--account", long_account, "--json", "--db", db))
    assert [k["id"] for k in as_json] == [k["id"] for k in created]
    assert all("key" not in k and k["revoked_at"] is None for k in as_json)
    accounts = json.loads(run("accounts", "list", "--json", "--db", db))
    assert accounts == [
        {
            "id": long_account,
            "name": "A name that is long enough to wrap",
            "parent_id": None,
            "billing_cycle": None,
        }
    ]


def test_scopes_repeated_or_comma_separated(tmp_path: Path) -> None:
    db = str(tmp_path / "u.db")
    run("accounts", "create", "Acme", "--id", "acme", "--db", db)
    for flags in (
        ["--scope", "read,ingest"],
        ["--scope", "read", "--scope", "ingest"],
        ["--scope", " ingest , read "],
    ):
        key = json.loads(run("keys", "create", "--account", "acme", *flags, "--db", db))
        assert key["scopes"] == ["ingest", "read"], flags
    bad = wide.invoke(
        app, ["keys", "create", "--account", "acme", "--scope", "read,admin", "--db", db]
    )
    assert bad.exit_code == 2 and "'admin'" in bad.output and "read, ingest" in bad.output


def test_help_texts_are_plain() -> None:
    group = typer.main.get_command(app)
    commands = [[]] + [
        [name, *([sub] if sub else [])]
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        for sub in (getattr(command, "commands", None) or [None])
    ]
    for path in commands:
        text = run(*path, "--help")
        assert "``" not in text, path


def test_ctrl_c_during_ingest_says_what_was_stored_and_a_rerun_resumes(tmp_path: Path) -> None:
    """Issue 11.11: SIGINT stops after the batch under way, prints the count, exits 130."""
    db = tmp_path / "u.db"
    run("accounts", "create", "Acme", "--id", "acme", "--db", str(db))
    events = tmp_path / "many.ndjson"
    total = 60_000
    line = '{"id":"e%d","account":"acme","metric":"m","ts":1735689600000}\n'
    events.write_text("".join(line % i for i in range(total)))
    command = [sys.executable, "-m", "usagemeter", "ingest", str(events), "--db", str(db)]
    proc = subprocess.Popen(
        [*command, "--batch", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # Interrupt once the first batches are stored: far from the end of 6,000 commits.
    while proc.poll() is None:
        try:
            with sqlite3.connect(db) as conn:
                if conn.execute("SELECT count(*) FROM events").fetchone()[0] > 0:
                    break
        except sqlite3.OperationalError:
            pass
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    summary = json.loads(out)
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert summary["interrupted"] is True and summary["accepted"] == stored < total
    assert f"interrupted: {stored:,} events stored" in " ".join(err.split())
    assert "Run the same command again to resume" in " ".join(err.split())
    again = subprocess.run(command, capture_output=True, text=True, check=True)
    assert json.loads(again.stdout) == {
        "records": total,
        "accepted": total - stored,
        "duplicates": stored,
    }
