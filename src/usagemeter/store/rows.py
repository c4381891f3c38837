"""The column values of an account or key row, the same on every SQL store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from usagemeter.model import Account, ApiKey

LOOKUP_BYTES = 8  # digest prefix indexed for key lookup; auth compares the whole digest
ACCOUNT_COLUMNS = "id, name, parent, cycle_anchor, cycle_period, created_at"
KEY_COLUMNS = "id, account, name, prefix, scopes, secret_hash, lookup, created_at"


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
