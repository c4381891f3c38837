"""The ClickHouse store's append path, apart from the store: a batch prepared in its caller's
thread (each event's sorted dimensions and tags and its payload digest), and the batches of
one group commit sorted into what each stores, repeats or conflicts with, and written as one
block of columns.

Why group commit: an INSERT's cost is largely per part written (the events table's months,
``event_ids``, every rollup's table, each part fsynced), not per row: four batches of 10,000
in one INSERT took 0.5 to 0.6 times as long as the four one by one (docs/clickhouse.md,
"Ingest, round 7"). Batches that arrive while an INSERT is under way wait for it anyway (one
lookup and insert at a time per process: see clickhouse.py), so they go in the next one
together.

Why prepare outside the lock: the digests and sorts are most of a batch's Python, and need
nothing from the database; done before the batch queues, they run while another group's
INSERT holds the store.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import msgspec

from usagemeter.model import AppendResult, Event

# Events per INSERT at most (the batches of one group together): five batches of 10,000, so
# that a group's batches do not all wait long for the last of them.
GROUP_EVENTS = 50_000

Dims = tuple[tuple[str, str], ...]
Tags = tuple[str, ...]


@functools.lru_cache(maxsize=65_536)
def set_id(items: Dims | Tags) -> int:
    """A stable 64-bit id of a dimension or tag set (its sorted members); a batch repeats a
    few sets many times, hence the cache."""
    key = hashlib.blake2b(msgspec.json.encode(items), digest_size=8).digest()
    return int.from_bytes(key, "big")


def digest(e: Event, dims: Dims, tags: Tags) -> str:
    """What identifies an event's payload, to tell a retry from a conflicting reuse of its
    id (hex). msgspec encodes it: json.dumps took half of a batch's time in Python."""
    payload = (e.metric, e.ts_ms, float(e.value), e.billable, e.key_id, dims, tags)
    return hashlib.blake2b(msgspec.json.encode(payload), digest_size=16).hexdigest()


_ENCODE_V1 = json.JSONEncoder(separators=(",", ":")).encode


def digest_v1(e: Event) -> str:
    """The digest events were stored with before ``digest``: a retry of one of those is
    still a retry, not a conflict. Computed only when the current digest does not match."""
    payload = [e.metric, e.ts_ms, e.value, e.billable, e.key_id]
    payload += [sorted(e.dimensions.items()), sorted(e.tags)]
    return hashlib.blake2b(_ENCODE_V1(payload).encode(), digest_size=16).hexdigest()


class Prepared:
    """A batch with what its events' columns and dedupe need, computed once."""

    __slots__ = ("digests", "dims", "events", "tags")

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = events
        # Most events have no tags, many no dimensions: skip their sorts.
        self.dims: list[Dims] = [
            tuple(sorted(e.dimensions.items())) if e.dimensions else () for e in events
        ]
        self.tags: list[Tags] = [tuple(sorted(e.tags)) if e.tags else () for e in events]
        self.digests = list(map(digest, events, self.dims, self.tags))


def pairs(batches: Sequence[Prepared]) -> list[tuple[str, str]]:
    """The distinct (account, id) pairs of a group's batches: what its dedupe lookup asks."""
    return list(dict.fromkeys((e.account_id, e.id) for b in batches for e in b.events))


class NewEvents:
    """The events of a group that are not stored yet, in order, with their prepared parts."""

    __slots__ = ("digests", "dims", "events", "tags")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.dims: list[Dims] = []
        self.tags: list[Tags] = []
        self.digests: list[str] = []

    def token(self) -> str:
        """The insert's dedupe token: it names exactly these new events, so that should
        another process insert the same ones at the same moment (one batch retried at two
        processes), ClickHouse keeps one of the two inserts."""
        accounts = (e.account_id for e in self.events)
        ids = (e.id for e in self.events)
        named = sorted(zip(accounts, ids, self.digests, strict=True))
        return hashlib.blake2b(msgspec.json.encode(named), digest_size=16).hexdigest()


def sort_out(
    batches: Sequence[Prepared], stored: dict[tuple[str, str], str], distinct: int
) -> tuple[list[AppendResult], NewEvents]:
    """Each batch's answer and the group's new events. ``stored`` holds the digests found
    for the group's pairs (``distinct`` of them); it takes each new event's too, so that a
    later batch of the group (or a later event of one batch) repeating an id is a duplicate,
    as it would be had the batches been written one by one."""
    new = NewEvents()
    if not stored and distinct == sum(len(b.events) for b in batches):
        # The usual group: no id stored, none twice. Every event is new, taken whole (the
        # loop below cost a batch of 10,000 about 15 ms).
        for batch in batches:
            new.events.extend(batch.events)
            new.dims.extend(batch.dims)
            new.tags.extend(batch.tags)
            new.digests.extend(batch.digests)
        return [AppendResult(len(b.events), 0) for b in batches], new
    results: list[AppendResult] = []
    for batch in batches:
        accepted = duplicates = 0
        conflicts: list[int] = []
        for index, (e, e_digest) in enumerate(zip(batch.events, batch.digests, strict=True)):
            pair = (e.account_id, e.id)
            earlier = stored.get(pair)
            if earlier is not None:
                duplicates += 1
                if earlier != e_digest and earlier != digest_v1(e):
                    conflicts.append(index)
                continue
            stored[pair] = e_digest
            accepted += 1
            new.events.append(e)
            new.dims.append(batch.dims[index])
            new.tags.append(batch.tags[index])
            new.digests.append(e_digest)
        results.append(AppendResult(accepted, duplicates, tuple(conflicts)))
    return results, new


def event_columns(new: NewEvents, first_seq: int) -> dict[str, list[Any]]:
    """The new events' columns, a comprehension each (faster than a tuple per event, and
    encoded in one call)."""
    events = new.events
    return {
        "account": [e.account_id for e in events],
        "metric": [e.metric for e in events],
        "ts": [e.ts_ms for e in events],
        "id": [e.id for e in events],
        "key": [e.key_id or "" for e in events],
        "billable": [1 if e.billable else 0 for e in events],
        "value": [float(e.value) for e in events],
        # As sent (a Map's order is not its identity); a mapping that is no dict, as a dict.
        "dims": [d if type(d) is dict else dict(d) for d in (e.dimensions for e in events)],
        "tags": new.tags,
        "dimset": [set_id(d) for d in new.dims],
        "tagset": [set_id(t) for t in new.tags],
        "seq": list(range(first_seq, first_seq + len(events))),
        "digest": new.digests,
    }
