"""Copy everything from one store to another (any to any: SQLite, PostgreSQL, ClickHouse):
accounts, keys with their secrets' digests (every issued secret keeps working), and events.

Safe to run again after an interruption: accounts and keys already in the target are left
as they are, and events already stored are recognised by (account, id) and skipped, so a
rerun copies only what is missing.

A source that was corrected is refused before anything is copied: a voided event's id must
stay taken (a late retry of it is a duplicate), and the counts of raw events retention dropped
live only in the source's rollups; a copy of the stored events carries neither, so the target
would count a retry again or lose usage. Limits, webhooks and their delivery records are not
copied either: they are set again on the target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from usagemeter.model import Event
from usagemeter.store.base import Conflict, NotFound, Store

DEFAULT_BATCH = 10_000  # events per append: the ingest limit


@dataclass
class Copied:
    accounts: int = 0
    keys: int = 0
    events: int = 0
    duplicates: int = 0  # events the target already had: a rerun's work already done


def copy_store(
    source: Store,
    target: Store,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int], None] = lambda done: None,
) -> Copied:
    """Copy accounts, keys and events; ``progress`` hears the number of events read after
    each batch."""
    refuse_corrected(source)
    copied = Copied()
    # Creation order puts every parent before its children.
    for account in source.list_accounts():
        try:
            target.create_account(account)
            copied.accounts += 1
        except Conflict:
            pass
    for key, digest in source.export_keys():
        try:
            target.create_key(key, digest)
            copied.keys += 1
        except Conflict:
            pass
        if key.revoked_at is not None and target.get_key(key.id).revoked_at is None:
            # Revoked in the target too; the date of revocation is the migration's.
            target.revoke_key(key.id)
    for events in _batches(source.iter_events(), batch):
        try:
            result = target.append(events)
        except NotFound as exc:
            raise ValueError(f"the target lacks what an event names: {exc}") from None
        copied.events += result.accepted
        copied.duplicates += result.duplicates
        progress(len(events))
    return copied


def refuse_corrected(source: Store) -> None:
    """ValueError naming every correction of ``source`` that a copy would lose."""
    problems = []
    if voids := source.list_voids():
        problems.append(
            f"it holds {len(voids)} void(s), whose voided ids must stay taken in the target"
        )
    if (horizon := source.raw_horizon()) is not None:
        day = datetime.fromtimestamp(horizon / 1000, UTC).isoformat().replace("+00:00", "Z")
        problems.append(
            f"retention dropped its raw events before {day}, whose counts live only in its rollups"
        )
    if problems:
        raise ValueError(
            "the source cannot be copied without changing an answer: "
            + "; ".join(problems)
            + ". Migrate copies stores that were never voided or retained."
        )


def _batches(events: Iterator[Event], size: int) -> Iterator[list[Event]]:
    batch: list[Event] = []
    for event in events:
        batch.append(event)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
