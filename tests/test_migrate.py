"""``usagemeter migrate``: any store to any store, everything copied, resumable."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import open_clickhouse
from usagemeter.auth import authenticate, issue_key
from usagemeter.cli import app
from usagemeter.corrections import VoidSelector
from usagemeter.migrate import copy_store
from usagemeter.model import Account, Event, Scope
from usagemeter.store.base import AggregateSpec, Measure, Store, Window
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import BillingCycle

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
runner = CliRunner()


def _fill(store: Store) -> dict[str, str]:
    store.create_account(Account("root", "Root", None, BillingCycle(date(2024, 1, 31))))
    store.create_account(Account("child", "Child", "root"))
    _, operator = issue_key(store, None, name="ops", scopes=[Scope.OPERATOR])
    _, reader = issue_key(store, "child", key_id="k_child", scopes=[Scope.READ])
    _, gone = issue_key(store, "root", key_id="k_gone", scopes=[Scope.READ])
    store.revoke_key("k_gone")
    store.append(
        [
            Event(
                id=f"e{i}",
                account_id="child" if i % 3 else "root",
                metric="Sessions" if i % 2 else "lookups",
                ts_ms=BASE_MS + i * 600_000,
                value=float(i),
                billable=i % 5 != 0,
                key_id="k_child" if i % 3 else None,
                dimensions={"session_id": f"s{i % 7}", "agent": "x" if i % 4 else "y"},
                tags=frozenset({"t1"} if i % 2 else set()),
            )
            for i in range(250)
        ]
    )
    return {"operator": operator, "reader": reader, "gone": gone}


def _everything(store: Store) -> tuple[object, ...]:
    spec = AggregateSpec(
        ("root", "child"),
        "Sessions",
        (Window(0, BASE_MS, BASE_MS + 86_400_000), Window(1, BASE_MS + 86_400_000, 2**40)),
        (Measure("sum"), Measure("latest"), Measure("unique_count", "session_id")),
        group_by=("agent",),
    )
    return (
        store.list_accounts(),
        store.export_keys(),
        sorted(store.iter_events(), key=lambda e: (e.account_id, e.id)),
        sorted(store.aggregate(spec), key=lambda r: (r.window, r.group)),
    )


def _invoke(*args: str) -> dict[str, int]:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    copied: dict[str, int] = json.loads(result.stdout)
    return copied


def test_sqlite_to_chdb_and_back_keeps_everything(tmp_path: Path, clickhouse_home: str) -> None:
    open_clickhouse(clickhouse_home).close()  # an empty target
    source = SQLiteStore(tmp_path / "from.db")
    secrets = _fill(source)
    before = _everything(source)
    source.close()

    there = _invoke("migrate", "--from", f"sqlite:///{tmp_path}/from.db", "--to", clickhouse_home)
    assert there == {"accounts": 2, "keys": 3, "events": 250, "duplicates": 0}
    again = _invoke("migrate", "--from", f"sqlite:///{tmp_path}/from.db", "--to", clickhouse_home)
    assert again == {"accounts": 0, "keys": 0, "events": 0, "duplicates": 250}

    back = _invoke("migrate", "--from", clickhouse_home, "--to", f"sqlite:///{tmp_path}/back.db")
    assert back["events"] == 250
    copy = SQLiteStore(tmp_path / "back.db")
    after = _everything(copy)
    # Revocation dates are the migration's; everything else is the same.
    assert [k.id for k, _ in after[1]] == [k.id for k, _ in before[1]]  # type: ignore[index]
    assert (after[0], after[2], after[3]) == (before[0], before[2], before[3])
    # The secrets issued on the source still open (or stay shut) on the copy.
    found = authenticate(copy, secrets["reader"])
    assert found is not None and found.id == "k_child"
    assert authenticate(copy, secrets["operator"]) is not None
    assert authenticate(copy, secrets["gone"]) is None
    assert copy.get_key("k_gone").revoked_at is not None
    copy.close()


def test_an_interrupted_copy_resumes_where_it_stopped(tmp_path: Path) -> None:
    source, target = SQLiteStore(tmp_path / "a.db"), SQLiteStore(tmp_path / "b.db")
    _fill(source)

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt  # after the first batch is stored

    with pytest.raises(KeyboardInterrupt):
        copy_store(source, target, batch=100, progress=interrupt)
    assert target.count_events() == 100
    resumed = copy_store(source, target, batch=100)
    assert (resumed.accounts, resumed.keys, resumed.events, resumed.duplicates) == (0, 0, 150, 100)
    assert _everything(target)[2] == _everything(source)[2]
    source.close()
    target.close()


def test_migrate_says_what_is_wrong(tmp_path: Path) -> None:
    same = runner.invoke(app, ["migrate", "--from", "x.db", "--to", "x.db"])
    assert same.exit_code == 2 and "same store" in same.output
    unknown = runner.invoke(app, ["migrate", "--from", "x.db", "--to", "mysql://h/db"])
    assert unknown.exit_code == 2 and "unknown store" in unknown.output


def test_a_corrected_source_is_refused_before_anything_is_copied(tmp_path: Path) -> None:
    """A void's ids and retention's dropped counts cannot travel as events: the copy says so
    instead of counting a voided id's retry again, or losing the dropped events' usage."""
    voided, retained = SQLiteStore(tmp_path / "v.db"), SQLiteStore(tmp_path / "r.db")
    for source in (voided, retained):
        _fill(source)
    voided.void_events(VoidSelector("child", ids=("e1",)), "refund", None, BASE_MS)
    retained.retain(BASE_MS + 3_600_000)
    for source, reason in ((voided, "1 void"), (retained, "retention dropped")):
        target = tmp_path / f"t{reason[0]}.db"
        result = runner.invoke(
            app, ["migrate", "--from", source.path, "--to", f"sqlite:///{target}"]
        )
        said = " ".join(result.output.split())  # the console wraps long lines
        assert result.exit_code == 2, said
        assert reason in said and "never voided" in said
        assert SQLiteStore(target).count_events() == 0
        source.close()
