"""Voids, amends and account deletion over HTTP and from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.conftest import Tenants, event
from usagemeter.cli import app
from usagemeter.model import Event, PortalToken
from usagemeter.store.base import Store
from usagemeter.store.chschema import TABLES
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.store.voidsql import ACCOUNT_ID_TABLES

DAY = {"start": "2025-01-01", "end": "2025-01-02", "granularity": "total"}


def _total(client: TestClient, op: dict[str, str], account: str = "other", **params: Any) -> Any:
    response = client.get(
        "/v1/query", params={"account": account, "metric": "m", **DAY, **params}, headers=op
    )
    assert response.status_code == 200, response.text
    return response.json()["total"]


def test_void_and_amend_over_http(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any, store: Store
) -> None:
    first = event("a", "other", "m", "2025-01-01T10:00:00Z", value=5)
    send(first, event("b", "other", "m", "2025-01-01T11:00:00Z", value=7))
    assert _total(client, op) == 12
    response = client.post(
        "/v1/events/void",
        json={"account": "other", "ids": ["a"], "reason": "duplicate upload"},
        headers=op,
    )
    assert response.status_code == 200, response.text
    void = response.json()
    assert void["count"] == 1 and void["reason"] == "duplicate upload"
    operator_key = next(iter(store.list_keys(None)))
    assert void["by"] == operator_key.id
    assert _total(client, op) == 7 and _total(client, op, aggregation="max") == 7
    assert send(first)["duplicates"] == 1  # the voided id stays taken
    amended = client.post(
        "/v1/events/amend",
        json={"account": "other", "id": "b", "value": 2, "reason": "metered twice"},
        headers=op,
    ).json()
    assert amended["replacement"] == f"b~{amended['id']}" and _total(client, op) == 2
    by_filter = client.post(
        "/v1/events/void",
        json={
            "account": "other",
            "metric": "m",
            "start": "2025-01-01",
            "end": "2025-01-02",
            "reason": "test day",
        },
        headers=op,
    ).json()
    assert by_filter["count"] == 1 and by_filter["selector"]["start"] == "2025-01-01T00:00:00Z"
    assert _total(client, op) == 0
    listed = client.get("/v1/events/voids", params={"account": "other"}, headers=op).json()
    assert [v["id"] for v in listed["data"]] == [void["id"], amended["id"], by_filter["id"]]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"account": "other", "ids": ["a"]}, 400, "reason"),
        ({"account": "other", "ids": ["a"], "reason": " "}, 400, "reason: required"),
        ({"account": "other", "reason": "r"}, 400, "metric: required"),
        ({"account": "other", "ids": ["a"], "metric": "m", "reason": "r"}, 400, "not both"),
        (
            {"account": "other", "metric": "m", "start": "x", "end": "y", "reason": "r"},
            400,
            "start",
        ),
        ({"account": "other", "ids": ["zz"], "reason": "r"}, 404, "zz"),
        ({"account": "ghost", "ids": ["a"], "reason": "r"}, 404, "ghost"),
        ({"account": "other", "ids": ["a"], "reason": "r", "extra": 1}, 400, "extra"),
    ],
)
def test_a_bad_void_says_what_to_fix(
    client: TestClient,
    op: dict[str, str],
    tenants: Tenants,
    send: Any,
    body: dict[str, Any],
    status: int,
    says: str,
) -> None:
    send(event("a", "other", "m", "2025-01-01T10:00:00Z"))
    response = client.post("/v1/events/void", json=body, headers=op)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    assert _total(client, op) == 1


def test_only_an_operator_voids_and_a_second_void_is_a_conflict(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any
) -> None:
    send(event("a", "other", "m", "2025-01-01T10:00:00Z"))
    body = {"account": "other", "ids": ["a"], "reason": "r"}
    refused = client.post("/v1/events/void", json=body, headers=tenants.headers("other"))
    assert refused.status_code == 403
    assert client.get("/v1/events/voids", headers=tenants.headers("other")).status_code == 403
    assert client.post("/v1/events/void", json=body, headers=op).status_code == 200
    again = client.post("/v1/events/void", json=body, headers=op)
    assert again.status_code == 409 and "voided before" in again.json()["error"]["message"]


def _count(store: Store, sql: str, values: list[Any]) -> int:
    marks = ",".join("?" * len(values))
    return int(store._limit_read(sql.format(marks=marks), values)[0][0])  # type: ignore[attr-defined]


def _rows_naming(store: Store, accounts: list[str]) -> dict[str, int]:
    """Rows left in every table that names one of the accounts (by id or row id)."""
    if isinstance(store, ClickHouseStore):
        names = ",".join(f"'{a}'" for a in accounts)
        counts = {
            table: int(
                store.transport.query(
                    f"SELECT count() FROM {table}"
                    f" WHERE {'id' if table == 'accounts' else 'account'} IN ({names})"
                )[0][0]
            )
            for table in TABLES
        }
        for table in ACCOUNT_ID_TABLES:
            counts[table] = _count(
                store.side,  # type: ignore[arg-type]
                f"SELECT count(*) FROM {table} WHERE account IN ({{marks}})",
                accounts,
            )
        return counts
    if isinstance(store, SQLiteStore):
        tables = [
            r[0] for r in store._limit_read("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
    else:
        tables = [
            r[0]
            for r in store._limit_read(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        ]
    rids = [
        r[0]
        for r in store._limit_read(  # type: ignore[attr-defined]
            "SELECT rid FROM accounts WHERE id IN ({})".format(",".join("?" * len(accounts))),
            accounts,
        )
    ] or [-1]
    counts = {
        "accounts": _count(store, "SELECT count(*) FROM accounts WHERE id IN ({marks})", accounts)
    }
    for table in tables:
        if "account" in _columns(store, table):
            values = accounts if table in ACCOUNT_ID_TABLES else rids
            counts[table] = _count(
                store, f"SELECT count(*) FROM {table} WHERE account IN ({{marks}})", values
            )
    return counts


def _columns(store: Store, table: str) -> list[str]:
    if isinstance(store, SQLiteStore):
        return [r[1] for r in store._limit_read(f"PRAGMA table_info({table})")]
    return [
        r[0]
        for r in store._limit_read(  # type: ignore[attr-defined]
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,)
        )
    ]


def test_deleting_an_account_leaves_nothing_of_it_or_its_subaccounts(
    client: TestClient, op: dict[str, str], tenants: Tenants, send: Any, store: Store
) -> None:
    from datetime import UTC, datetime, timedelta

    tree = ["root", "child", "grandchild", "sibling"]
    send(*[event(f"e{a}", a, "m", "2025-01-01T10:00:00Z", value=3) for a in [*tree, "other"]])
    client.post(
        "/v1/events/void", json={"account": "child", "ids": ["echild"], "reason": "r"}, headers=op
    )
    created = client.post(
        "/v1/accounts/root/limits", json={"metric": "m", "amount": 10}, headers=op
    )
    assert created.status_code in (200, 201), created.text
    now = datetime.now(UTC)
    store.create_portal_token(
        PortalToken("pt_1", "grandchild", None, now, now + timedelta(hours=1)), b"\x01" * 32
    )
    before = _rows_naming(store, tree)
    assert before["accounts"] == 4 and sum(before.values()) > 10
    response = client.delete("/v1/accounts/root", headers=op)
    assert response.status_code == 200, response.text
    body = response.json()
    assert sorted(body["deleted"]) == sorted(tree) and body["rows"]["accounts"] == 4
    assert {t: n for t, n in _rows_naming(store, tree).items() if n} == {}
    # The other account keeps everything; the deleted ones are gone for every route.
    assert _total(client, op) == 3
    assert client.get("/v1/accounts/root", headers=op).status_code == 404
    assert client.delete("/v1/accounts/root", headers=op).status_code == 404
    assert client.delete("/v1/accounts/other", headers=tenants.headers("other")).status_code == 403
    # Events for a deleted account are refused, as for one that never existed.
    late = client.post(
        "/v1/events", json=[event("elate", "root", "m", "2025-01-01T10:00:00Z")], headers=op
    )
    assert late.status_code == 400 and "root" in late.text, late.text
    # The id may be used again, from nothing.
    assert (
        client.post("/v1/accounts", json={"id": "root", "name": "R"}, headers=op).status_code == 201
    )
    send(event("eroot", "root", "m", "2025-01-01T10:00:00Z", value=1))
    assert _total(client, op, account="root") == 1


runner = CliRunner(env={"COLUMNS": "200"})


def _cli(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_command_line_voids_amends_lists_and_deletes(tmp_path: Path) -> None:
    db = str(tmp_path / "u.db")
    store = SQLiteStore(db)
    from usagemeter.model import Account

    store.create_account(Account("acme", "Acme"))
    store.append(
        [
            Event(f"e{i}", "acme", "m", 1_735_725_600_000 + i, float(i), dimensions={"r": "eu"})
            for i in range(4)
        ]
    )
    store.close()
    void = _cli(
        "void", "--account", "acme", "--id", "e1", "--id", "e2", "--reason", "test", "--db", db
    )
    assert void["count"] == 2 and void["by"] is None
    amended = _cli(
        "amend",
        "--account",
        "acme",
        "--id",
        "e3",
        "--value",
        "10",
        "--new-id",
        "e3b",
        "--reason",
        "fix",
        "--db",
        db,
    )
    assert amended["replacement"] == "e3b"
    by_filter = _cli(
        "void",
        "--account",
        "acme",
        "--metric",
        "m",
        "--start",
        "2025-01-01",
        "--end",
        "2025-01-02",
        "--dimension",
        "r=eu",
        "--reason",
        "all",
        "--db",
        db,
    )
    assert by_filter["count"] == 2  # e0 and e3b
    assert [v["id"] for v in _cli("voids", "--db", db)] == [
        void["id"],
        amended["id"],
        by_filter["id"],
    ]
    refused = runner.invoke(
        app, ["void", "--account", "acme", "--id", "e1", "--reason", "x", "--db", db]
    )
    assert refused.exit_code == 2 and "no longer stored" in refused.output
    no_yes = runner.invoke(app, ["accounts", "delete", "acme", "--db", db])
    assert no_yes.exit_code == 2 and "--yes" in no_yes.output
    deleted = _cli("accounts", "delete", "acme", "--yes", "--db", db)
    assert deleted["deleted"] == ["acme"] and deleted["rows"]["tombstones"] == 5  # e0 to e3 and e3b
    assert _cli("compact", "--db", db) == {"compacted": True}
