"""POST /v1/events remembers keys it authenticated (auth.KeyCache), and a revocation still
stops a key at once: the SQLite store checks the key again in the transaction that stores
the batch, and every other answer checks it in the store first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Clock, event
from usagemeter.api.app import create_app
from usagemeter.auth import hash_secret, issue_key
from usagemeter.model import Account, Event, Scope
from usagemeter.store.base import KeyRevoked
from usagemeter.store.sqlite import SQLiteStore


@pytest.fixture
def sqlite(db_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(db_path)
    store.create_account(Account("acme", "Acme"))
    yield store
    store.close()


@pytest.fixture
def web(sqlite: SQLiteStore) -> Iterator[TestClient]:
    with TestClient(create_app(sqlite, now=Clock())) as client:
        yield client


def _ingest_key(store: SQLiteStore, key_id: str, scopes: list[Scope] | None = None) -> str:
    return issue_key(store, "acme", scopes=scopes or [Scope.INGEST], key_id=key_id)[1]


def _post(web: TestClient, secret: str, *events: dict[str, object]) -> tuple[int, str]:
    response = web.post(
        "/v1/events", json=list(events), headers={"Authorization": f"Bearer {secret}"}
    )
    return response.status_code, response.json().get("error", {}).get("code", "")


def _ok(n: int) -> dict[str, object]:
    return event(f"e{n}", "acme", "lookups", 1735812000000 + n)


def test_a_key_revoked_by_another_process_is_refused_at_once(
    web: TestClient, sqlite: SQLiteStore, db_path: Path
) -> None:
    secret = _ingest_key(sqlite, "key_ingest")
    assert _post(web, secret, _ok(1)) == (200, "")
    assert _post(web, secret, _ok(2)) == (200, "")  # from the cache now
    other = SQLiteStore(db_path)  # another process on the same file
    try:
        other.revoke_key("key_ingest")
    finally:
        other.close()
    assert _post(web, secret, _ok(3)) == (401, "unauthorized")
    assert sqlite.count_events() == 2


def test_a_revoked_cached_key_gets_401_whatever_else_is_wrong(
    web: TestClient, sqlite: SQLiteStore
) -> None:
    ingest = _ingest_key(sqlite, "key_ingest")
    reader = _ingest_key(sqlite, "key_reader", [Scope.READ])
    assert _post(web, ingest, _ok(1)) == (200, "")
    assert _post(web, reader, _ok(1)) == (403, "forbidden")  # a live key without the scope
    sqlite.revoke_key("key_ingest")
    sqlite.revoke_key("key_reader")
    assert _post(web, ingest, event("bad", "acme", "lookups", "yesterday")) == (
        401,
        "unauthorized",
    )
    assert _post(web, reader, _ok(2)) == (401, "unauthorized")
    bad_json = web.post("/v1/events", content=b"[{", headers={"Authorization": f"Bearer {ingest}"})
    assert bad_json.status_code == 401


def test_the_store_refuses_a_batch_whose_key_no_longer_stands(sqlite: SQLiteStore) -> None:
    secret = _ingest_key(sqlite, "key_ingest")
    guard = (hash_secret(secret), "key_ingest")

    def batch(n: int) -> list[Event]:
        return [Event(f"s{n}", "acme", "lookups", 1735812000000 + n)]

    assert sqlite.submit(batch(1), guard).result().accepted == 1
    with pytest.raises(KeyRevoked):  # the right secret under another key's id
        sqlite.submit(batch(2), (guard[0], "key_other")).result()
    sqlite.revoke_key("key_ingest")
    with pytest.raises(KeyRevoked):
        sqlite.submit(batch(3), guard).result()
    assert sqlite.submit(batch(4)).result().accepted == 1  # unguarded: the caller checked
    assert sqlite.count_events() == 2
