"""The portal_tokens table's SQL and rows, shared by the SQLite and PostgreSQL stores (the
two differ only in their placeholder). The table itself is in schema.py and pgschema.py."""

from __future__ import annotations

import json
from typing import Any

from usagemeter.model import PortalToken
from usagemeter.store.rows import LOOKUP_BYTES
from usagemeter.timewindows import from_ms, to_ms

_COLUMNS = "id, account, metrics, created_at, expires_at, revoked_at, secret_hash"


def insert(ph: str) -> str:
    return f"INSERT INTO portal_tokens ({_COLUMNS}, lookup) VALUES ({', '.join([ph] * 8)})"


def select_by_lookup(ph: str) -> str:
    return f"SELECT {_COLUMNS} FROM portal_tokens WHERE lookup = {ph}"


def revoke(ph: str) -> str:
    return (
        f"UPDATE portal_tokens SET revoked_at = coalesce(revoked_at, {ph}) WHERE id = {ph}"
        f" RETURNING {_COLUMNS}"
    )


def params(token: PortalToken, secret_hash: bytes) -> tuple[Any, ...]:
    metrics = json.dumps(sorted(token.metrics)) if token.metrics is not None else None
    return (
        token.id,
        token.account_id,
        metrics,
        to_ms(token.created_at),
        to_ms(token.expires_at),
        None,
        secret_hash,
        secret_hash[:LOOKUP_BYTES],
    )


def token_from_row(row: tuple[Any, ...]) -> tuple[PortalToken, bytes]:
    """A token and its secret's digest from a row of ``_COLUMNS``."""
    ident, account, metrics, created, expires, revoked, digest = row
    token = PortalToken(
        id=ident,
        account_id=account,
        metrics=frozenset(json.loads(metrics)) if metrics is not None else None,
        created_at=from_ms(created),
        expires_at=from_ms(expires),
        revoked_at=from_ms(revoked) if revoked is not None else None,
    )
    return token, bytes(digest)
