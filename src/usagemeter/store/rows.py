"""The column values of an account or key row, the same on every SQL store."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from typing import Any

from usagemeter.model import Account, ApiKey, Scope
from usagemeter.timewindows import BillingCycle

# A write path keeps the row ids of the accounts and keys it has looked up for this long: an
# account deleted by another process sharing the database (and perhaps created again, under
# a new row id) is then looked up afresh within that time. This process forgets at once.
ROW_IDS_KEPT_FOR = 1.0  # seconds


def row_ids_stale(since: float) -> bool:
    """Whether row ids kept since ``since`` (time.monotonic()) are to be looked up again."""
    return time.monotonic() - since > ROW_IDS_KEPT_FOR


LOOKUP_BYTES = 8  # digest prefix indexed for key lookup; auth compares the whole digest
ACCOUNT_COLUMNS = "id, name, parent, cycle_anchor, cycle_period, created_at"
KEY_COLUMNS = "id, account, name, prefix, scopes, secret_hash, lookup, created_at"
# What account_from_row and key_from_row read (the owner's id joined in), from FROM on.
ACCOUNT_SELECT = (
    "a.id, a.name, p.id, a.cycle_anchor, a.cycle_period, a.created_at"
    " FROM accounts a LEFT JOIN accounts p ON p.rid = a.parent"
)
KEY_SELECT = (
    "k.id, a.id, k.name, k.prefix, k.scopes, k.created_at, k.revoked_at, k.secret_hash"
    " FROM keys k LEFT JOIN accounts a ON a.rid = k.account"
)


def account_values(account: Account, parent: int | None) -> tuple[Any, ...]:
    """ACCOUNT_COLUMNS' values; ``parent`` is the parent's row id."""
    created = account.created_at or datetime.now(UTC)
    cycle = account.billing_cycle
    return (
        account.id,
        account.name,
        parent,
        cycle.anchor.isoformat() if cycle else None,
        cycle.period if cycle else None,
        int(created.timestamp() * 1000),
    )


def key_values(key: ApiKey, account: int | None, secret_hash: bytes) -> tuple[Any, ...]:
    """KEY_COLUMNS' values; ``account`` is the account's row id (None: an operator key)."""
    return (
        key.id,
        account,
        key.name,
        key.prefix,
        ",".join(sorted(s.value for s in key.scopes)),
        secret_hash,
        secret_hash[:LOOKUP_BYTES],
        int(key.created_at.timestamp() * 1000),
    )


def account_from_row(row: tuple[Any, ...]) -> Account:
    """An Account from the row a store's account query reads (id, name, parent's id,
    cycle anchor, cycle period, created ms)."""
    cycle = None
    if row[3] is not None:
        cycle = BillingCycle(date.fromisoformat(row[3]), row[4])
    return Account(row[0], row[1], row[2], cycle, from_ms(row[5]))


def key_from_row(row: tuple[Any, ...]) -> ApiKey:
    """An ApiKey from the row a store's key query reads (id, account's id, name, prefix,
    scopes, created ms, revoked ms)."""
    scopes = frozenset(Scope(s) for s in row[4].split(",") if s)
    created = from_ms(row[5])
    assert created is not None
    return ApiKey(row[0], row[1], row[2], row[3], scopes, created, from_ms(row[6]))


def from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)
