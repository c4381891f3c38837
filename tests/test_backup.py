"""Issue 11.2: backup while ingest goes on, restore, and an export that loads into an empty
store."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

from typer.testing import CliRunner

from tests.conftest import Tenants, sqlite_only
from usagemeter.auth import authenticate, issue_key
from usagemeter.cli import app
from usagemeter.engine import Engine
from usagemeter.model import Event, Query, Scope
from usagemeter.store.sqlite import SQLiteStore

runner = CliRunner(env={"COLUMNS": "200"})
BATCH = 50
T0 = 1_735_689_600_000  # 2025-01-01


def run(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _batch(n: int) -> list[Event]:
    return [
        Event(f"b{n}-{i}", "root", "lookups", T0 + n * 1000 + i, dimensions={"batch": str(n)})
        for i in range(BATCH)
    ]


def _per_batch(store: SQLiteStore) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in store.iter_events(["root"]):
        counts[e.dimensions["batch"]] = counts.get(e.dimensions["batch"], 0) + 1
    return counts


@sqlite_only
def test_backup_during_ingest_holds_every_acknowledged_batch_whole(
    store: SQLiteStore, tenants: Tenants, db_path: Path, tmp_path: Path
) -> None:
    acknowledged: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set() or n < 20:
            store.append(_batch(n))
            acknowledged.append(n)
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    while len(acknowledged) < 10:  # well under way
        threading.Event().wait(0.005)
    before = set(acknowledged)
    dest = tmp_path / "backup.db"
    out = json.loads(run("backup", str(dest), "--db", str(db_path)))
    stop.set()
    thread.join()
    after = set(acknowledged)

    copy = SQLiteStore(dest)
    counts = _per_batch(copy)
    in_copy = {int(b) for b in counts}
    assert before <= in_copy <= after  # everything acknowledged before it began, and more
    assert set(counts.values()) == {BATCH}  # no batch half in it
    assert out["events"] == len(in_copy) * BATCH
    # The rollups in the copy agree with its events: a query reads them.
    end = datetime(2025, 1, 2, tzinfo=UTC)
    query = Query(("root",), "lookups", datetime(2025, 1, 1, tzinfo=UTC), end)
    assert Engine(copy).run(query).total == (len(in_copy) * BATCH,)
    # The copy's keys work: accounts and keys came along.
    assert authenticate(copy, tenants.secrets["child"]) is not None
    copy.close()

    # A backup never overwrites.
    again = runner.invoke(app, ["backup", str(dest), "--db", str(db_path)])
    assert again.exit_code == 2 and "exists" in again.output

    # Restore: refused over an existing file without --force, then done with it.
    target = tmp_path / "restored.db"
    SQLiteStore(target).close()
    refused = runner.invoke(app, ["restore", str(dest), "--db", str(target)])
    assert refused.exit_code == 2 and "--force" in refused.output
    restored = json.loads(run("restore", str(dest), "--db", str(target), "--force"))
    assert restored["events"] == out["events"]
    assert _per_batch(SQLiteStore(target)) == counts
    # Into a new file, no --force needed.
    fresh = tmp_path / "fresh.db"
    assert json.loads(run("restore", str(dest), "--db", str(fresh)))["events"] == out["events"]


def test_restore_refuses_what_is_not_a_backup(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("not a database at all, just text" * 100)
    result = runner.invoke(app, ["restore", str(junk), "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 2 and "not a SQLite file" in result.output
    missing = runner.invoke(app, ["restore", str(tmp_path / "nope.db"), "--db", "x.db"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


@sqlite_only
def test_export_with_accounts_loads_into_an_empty_store(
    store: SQLiteStore, tenants: Tenants, db_path: Path, tmp_path: Path
) -> None:
    operator, operator_secret = issue_key(store, None, name="ops", scopes=[Scope.OPERATOR])
    store.revoke_key(tenants.key_ids["sibling"])
    store.append([*_batch(1), Event("x", "grandchild", "lookups", T0, key_id="key_grandchild")])
    exported = tmp_path / "all.ndjson"
    run("export", "--with-accounts", "--output", str(exported), "--db", str(db_path))

    empty = tmp_path / "empty.db"
    loaded = json.loads(run("ingest", str(exported), "--db", str(empty)))
    assert loaded["accepted"] == BATCH + 1
    assert loaded["accounts"] == 5 and loaded["keys"] == 6
    copy = SQLiteStore(empty)
    assert {(a.id, a.parent_id) for a in copy.list_accounts()} == {
        (a.id, a.parent_id) for a in store.list_accounts()
    }
    assert copy.get_account("root").billing_cycle == store.get_account("root").billing_cycle
    # Key hashes travel: the old secrets authenticate; a revoked key stays revoked.
    assert authenticate(copy, operator_secret) == store.get_key(operator.id)
    assert authenticate(copy, tenants.secrets["root"]) is not None
    assert authenticate(copy, tenants.secrets["sibling"]) is None
    # Loaded again: nothing new, nothing counted twice.
    again = json.loads(run("ingest", str(exported), "--db", str(empty)))
    assert again["accepted"] == 0 and again["duplicates"] == BATCH + 1
    assert "accounts" not in again

    # One account's subtree: its parent is left out, and so are operator keys.
    part = tmp_path / "child.ndjson"
    run(
        "export",
        "--with-accounts",
        "--account",
        "child",
        "--output",
        str(part),
        "--db",
        str(db_path),
    )
    records = [json.loads(line) for line in part.read_text().splitlines()]
    accounts = [(r["id"], r["parent"]) for r in records if r.get("type") == "account"]
    assert accounts == [("child", None), ("grandchild", "child")]
    assert {r["id"] for r in records if r.get("type") == "key"} == {"key_child", "key_grandchild"}
    other = tmp_path / "other.db"
    assert json.loads(run("ingest", str(part), "--db", str(other)))["accepted"] == 1
    assert (
        runner.invoke(
            app, ["export", "--with-accounts", "--format", "csv", "--db", str(db_path)]
        ).exit_code
        == 2
    )
