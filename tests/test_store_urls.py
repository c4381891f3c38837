"""One option picks the store everywhere: URLs, the CLI's --store and USAGEMETER_STORE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from usagemeter.cli import app
from usagemeter.store import open_store, redact
from usagemeter.store.postgres import PostgresStore
from usagemeter.store.sqlite import SQLiteStore


def test_sqlite_urls_and_bare_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///rel.db")
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db")  # four slashes: an absolute path
    bare = open_store("bare.db")
    for store in (relative, absolute, bare):
        assert isinstance(store, SQLiteStore)
        store.close()
    assert {p.name for p in tmp_path.glob("*.db")} == {"rel.db", "abs.db", "bare.db"}


def test_bad_urls_say_what_to_write() -> None:
    with pytest.raises(ValueError, match=r"postgresql://user:password@host") as bad:
        open_store("mysql://bob:hunter2@db/usage")
    assert "hunter2" not in str(bad.value)
    with pytest.raises(ValueError, match="SQLite file's path"):
        open_store("sqlite://")
    with pytest.raises(ValueError, match="pool_size"):
        open_store("postgresql://localhost/x?pool_size=zero")


def test_a_password_never_reaches_a_message() -> None:
    assert redact("postgresql://bob:hunter2@db:5432/usage") == "postgresql://bob:***@db:5432/usage"
    assert redact("postgresql://db/usage") == "postgresql://db/usage"
    with pytest.raises(ConnectionError) as down:
        open_store("postgresql://bob:hunter2@127.0.0.1:1/usage")
    assert "hunter2" not in str(down.value) and "127.0.0.1" in str(down.value)


def test_a_postgresql_url_with_a_pool_size(postgres_url: str) -> None:
    sep = "&" if "?" in postgres_url else "?"
    store = open_store(f"{postgres_url}{sep}pool_size=2")
    assert isinstance(store, PostgresStore)
    assert store._pool.max_size == 2
    store.close()


def test_every_command_takes_store_or_the_environment(postgres_url: str) -> None:
    from tests.conftest import empty_postgres

    store = PostgresStore(postgres_url)
    empty_postgres(store)
    runner = CliRunner(env={"COLUMNS": "200"})
    made = runner.invoke(
        app, ["accounts", "create", "Acme", "--id", "acme", "--store", postgres_url]
    )
    assert made.exit_code == 0, made.output
    # The environment variable names the same database; a file given by --db is not used.
    env = CliRunner(env={"COLUMNS": "200", "USAGEMETER_STORE": postgres_url})
    listing = env.invoke(app, ["accounts", "list"])
    assert listing.exit_code == 0 and "acme" in listing.stdout
    key = json.loads(env.invoke(app, ["keys", "create", "--account", "acme"]).stdout)
    assert [k.id for k in store.list_keys("acme")] == [key["id"]]
    store.close()


def test_a_command_closes_the_store_it_opened(postgres_server: str) -> None:
    """A command's PostgreSQL connections end with the command, not at the process's exit:
    a command run inside a longer process (a test's runner, a script) left its pool open,
    retrying its connections once the server was gone."""
    import psycopg

    from tests.conftest import make_database

    # A database of its own: other tests' stores, closing in the background, connect to the
    # shared one.
    url = make_database(postgres_server, "usagemeter_cli_close")

    def others() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            ).fetchone()
        assert row is not None
        return int(row[0])

    assert others() == 0
    runner = CliRunner(env={"COLUMNS": "200", "USAGEMETER_STORE": url})
    listing = runner.invoke(app, ["accounts", "list"])
    assert listing.exit_code == 0, listing.output
    refused = runner.invoke(app, ["keys", "revoke", "no-such-key"])
    assert refused.exit_code != 0  # a command that fails closes it too
    assert others() == 0


def test_a_nul_character_is_a_clear_400_not_a_500(postgres_url: str) -> None:
    """PostgreSQL text cannot hold U+0000; such an event was a 500 from deep in the driver."""
    from fastapi.testclient import TestClient

    from tests.conftest import empty_postgres
    from usagemeter.api.app import create_app
    from usagemeter.auth import issue_key
    from usagemeter.model import Account, Scope

    store = PostgresStore(postgres_url)
    empty_postgres(store)
    store.create_account(Account("acme", "Acme"))
    _, secret = issue_key(store, None, name="ops", scopes=[Scope.OPERATOR])
    headers = {"Authorization": f"Bearer {secret}"}
    good = {"id": "fine", "account": "acme", "metric": "m", "ts": 1_735_689_600_000}
    with TestClient(create_app(store)) as client:
        for bad, field in (
            ({**good, "id": "a\u0000b"}, "id"),
            ({**good, "dimensions": {"agent": "x\u0000"}}, "dimensions.agent"),
            ({**good, "tags": ["t\u0000"]}, "tags"),
        ):
            response = client.post("/v1/events", json=[good, bad], headers=headers)
            assert response.status_code == 400, response.text
            assert f"event 1: {field}: contains a NUL" in response.json()["error"]["message"]
        assert store.count_events() == 0
    store.close()


def test_a_sqlite_file_that_cannot_be_opened_is_a_clear_error_everywhere(tmp_path: Path) -> None:
    """Regression: a missing directory or a file that is not a database ended commands such as
    ``compact`` and ``query`` in a traceback."""
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("hello\n")
    for path, said in (
        (tmp_path / "missing" / "usage.db", "unable to open database file"),
        (not_a_database, "file is not a database"),
    ):
        with pytest.raises(ValueError, match=said):
            open_store(str(path))
        for command in (["compact"], ["query", "m", "a"], ["accounts", "list"]):
            result = CliRunner().invoke(app, [*command, "--db", str(path)])
            assert result.exit_code == 2, result.output
            assert said in " ".join(result.output.split())


def test_serve_refuses_a_port_that_does_not_exist(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--port", "99999", "--db", str(tmp_path / "u.db")])
    assert result.exit_code == 2 and "65535" in result.output
