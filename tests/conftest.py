"""Fixtures every test composes: a real SQLite file, the real app, an HTTP client, a clock."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from usagemeter.api.app import create_app
from usagemeter.auth import issue_key
from usagemeter.model import Account, Scope
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import BillingCycle


@dataclass
class Clock:
    """A settable 'now' for a real server: endpoints read it for defaults and 'today'."""

    at: datetime = field(default_factory=lambda: datetime(2025, 3, 15, 12, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "usage.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(db_path)
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(store: SQLiteStore, clock: Clock) -> Iterator[TestClient]:
    with TestClient(create_app(store, now=clock)) as c:
        yield c


@pytest.fixture
def operator_secret(store: SQLiteStore) -> str:
    return issue_key(store, None, name="ops", scopes=[Scope.OPERATOR])[1]


@pytest.fixture
def op(operator_secret: str) -> dict[str, str]:
    """Headers of an operator request."""
    return {"Authorization": f"Bearer {operator_secret}"}


class Tenants:
    """A small account tree with keys, built through the store:

    root ── child ── grandchild
         └─ sibling
    other
    """

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        store.create_account(
            Account("root", "Root", None, BillingCycle(datetime(2024, 1, 31).date()))
        )
        store.create_account(Account("child", "Child", "root"))
        store.create_account(Account("grandchild", "Grandchild", "child"))
        store.create_account(Account("sibling", "Sibling", "root"))
        store.create_account(Account("other", "Other"))
        self.secrets: dict[str, str] = {}
        self.key_ids: dict[str, str] = {}
        for account in ("root", "child", "grandchild", "sibling", "other"):
            key, secret = issue_key(
                store,
                account,
                name=account,
                prefix="ak_",
                scopes=[Scope.READ, Scope.INGEST],
                key_id=f"key_{account}",
            )
            self.secrets[account] = secret
            self.key_ids[account] = key.id

    def headers(self, account: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[account]}"}


@pytest.fixture
def tenants(store: SQLiteStore) -> Tenants:
    return Tenants(store)


def event(id: str, account: str, metric: str, ts: str | int, **fields: Any) -> dict[str, Any]:
    return {"id": id, "account": account, "metric": metric, "ts": ts, **fields}


@pytest.fixture
def send(client: TestClient, op: dict[str, str]) -> Any:
    """POST events as the operator and assert they were accepted."""

    def _send(*events: dict[str, Any]) -> dict[str, Any]:
        response = client.post("/v1/events", json=list(events), headers=op)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    return _send
