"""Backups: restoring a copy made by ``SQLiteStore.backup``, and the account and key records
that let an export load into an empty store.

An export with accounts carries each key's secret *hash* (never a secret: none is stored), so
the keys of the old store keep working against the new one. A revoked key stays revoked, from
the time it is loaded.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from datetime import date
from pathlib import Path
from typing import Any

from usagemeter.model import Account, ApiKey, Scope
from usagemeter.store.base import Conflict, NotFound, Store
from usagemeter.timewindows import BillingCycle, isoformat, parse_instant

# Tables every usagemeter file has: a file without them is not a backup of ours.
_TABLES = ("accounts", "keys", "events", "metrics")


class RestoreRefused(ValueError):
    """The source is not a usable backup, or the target exists and --force was not given."""


def check_backup(path: Path) -> None:
    """RestoreRefused unless ``path`` is a readable, intact usagemeter SQLite file."""
    if not path.is_file():
        raise RestoreRefused(f"{path} does not exist")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            missing = [t for t in _TABLES if t not in names]
            if missing:
                raise RestoreRefused(f"{path} is not a usagemeter file (no {', '.join(missing)})")
            problem = conn.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise RestoreRefused(f"{path} is damaged: {problem}")
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise RestoreRefused(f"{path} is not a SQLite file: {exc}") from None


def restore(source: Path, target: Path, *, force: bool = False) -> None:
    """Copy the backup ``source`` over ``target``, page by page through SQLite's backup API
    (so a WAL left beside the target is dealt with by SQLite, not by file juggling). Stop
    the server on ``target`` first: its connections would keep reading the old file."""
    check_backup(source)
    if target.exists() and not force:
        raise RestoreRefused(
            f"{target} exists; restoring replaces everything in it: add --force to do so"
        )
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


# ------------------------------------------------------ export --with-accounts


def _parents_first(accounts: list[Account]) -> list[Account]:
    by_id = {a.id: a for a in accounts}
    done: set[str] = set()
    ordered: list[Account] = []

    def visit(account: Account) -> None:
        if account.id in done:
            return
        if account.parent_id in by_id:
            visit(by_id[account.parent_id])
        done.add(account.id)
        ordered.append(account)

    for account in accounts:
        visit(account)
    return ordered


def account_records(store: Store, only: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """``{"type": "account", ...}`` then ``{"type": "key", ...}`` records, parents before
    children, for every account (or those in ``only``) and their keys; operator keys only in
    a whole export."""
    accounts = [a for a in store.list_accounts() if only is None or a.id in only]
    ordered = _parents_first(accounts)
    for a in ordered:
        cycle = a.billing_cycle
        yield {
            "type": "account",
            "id": a.id,
            "name": a.name,
            "parent": a.parent_id if only is None or a.parent_id in only else None,
            "billing_cycle": {"anchor": str(cycle.anchor), "period": cycle.period}
            if cycle
            else None,
        }
    owners: list[str | None] = [a.id for a in ordered]
    if only is None:
        owners.insert(0, None)
    digests = {key.id: digest for key, digest in store.export_keys()}
    for owner in owners:
        for k in store.list_keys(owner):
            yield {
                "type": "key",
                "id": k.id,
                "account": k.account_id,
                "name": k.name,
                "prefix": k.prefix,
                "scopes": sorted(s.value for s in k.scopes),
                "created_at": isoformat(k.created_at),
                "revoked": k.revoked_at is not None,
                "secret_hash": digests[k.id].hex(),
            }


def load_record(store: Store, record: Mapping[str, Any]) -> bool:
    """Create the account or key a record describes; False when one of that id is already
    there. ValueError (naming the field) when the record is malformed."""
    kind = record.get("type")
    try:
        if kind == "account":
            cycle = record.get("billing_cycle")
            account = Account(
                id=str(record["id"]),
                name=str(record["name"]),
                parent_id=record.get("parent"),
                billing_cycle=BillingCycle(date.fromisoformat(cycle["anchor"]), cycle["period"])
                if cycle
                else None,
            )
            try:
                store.get_account(account.id)
                return False
            except NotFound:
                store.create_account(account)
                return True
        if kind == "key":
            key = ApiKey(
                id=str(record["id"]),
                account_id=record.get("account"),
                name=str(record.get("name", "")),
                prefix=str(record.get("prefix", "")),
                scopes=frozenset(Scope(s) for s in record["scopes"]),
                created_at=parse_instant(record["created_at"]),
            )
            try:
                store.create_key(key, bytes.fromhex(record["secret_hash"]))
            except Conflict:
                return False
            if record.get("revoked"):
                store.revoke_key(key.id)
            return True
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{kind} record: missing or malformed {exc}") from None
    raise ValueError(f"unknown record type {kind!r}: expected account or key")
