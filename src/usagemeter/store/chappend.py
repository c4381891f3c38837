"""The ClickHouse store's append path, apart from the store: a batch prepared in its caller's
thread (its events' columns: sorted dimensions and tags, set ids, payload digests), and the
batches of one group commit sorted into what each stores, repeats or conflicts with, and
written as one block of columns.

Why group commit: an INSERT's cost is largely per part written (the events table's months,
``event_ids``, every rollup's table, each part fsynced), not per row: four batches of 10,000
in one INSERT took 0.5 to 0.6 times as long as the four one by one (docs/clickhouse.md,
"Ingest, round 7"). Batches that arrive while an INSERT is under way wait for it anyway (one
lookup and insert at a time per process: see clickhouse.py), so they go in the next one
together.

Why prepare outside the lock: the digests, sorts and columns are most of a batch's Python,
and need nothing from the database; done before the batch queues, they run while another
group's INSERT holds the store (and waits for its disk). In the lock a group only
concatenates its batches' columns (docs/clickhouse.md, "Ingest, round 8").
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from usagemeter.model import AppendResult, Event

# Events per INSERT at most (the batches of one group together): five batches of 10,000, so
# that a group's batches do not all wait long for the last of them.
GROUP_EVENTS = 50_000

Dims = tuple[tuple[str, str], ...]
# Each id's hash for an index of stored ids (chidindex.id_hashes): numpy, which only a chDB
# store needs, so typed loosely here.
IdHasher = Callable[[Sequence[str]], Any]
Tags = tuple[str, ...]

# Empty hashers of each size, copied for every digest and set id: the same bytes as
# hashlib.blake2b(data, digest_size=n), but the constructor's keyword parsing cost a third
# of each hash (7.4 against 5.0 ms per 10,000 digests).
_SET_HASH = hashlib.blake2b(digest_size=8)
_DIGEST_HASH = hashlib.blake2b(digest_size=16)


@functools.lru_cache(maxsize=65_536)
def set_id(items: Dims | Tags) -> int:
    """A stable 64-bit id of a dimension or tag set (its sorted members); a batch repeats a
    few sets many times, hence the cache."""
    key = _SET_HASH.copy()
    key.update(msgspec.json.encode(items))
    return int.from_bytes(key.digest(), "big")


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


def _digests(payloads: Iterable[tuple[Any, ...]]) -> list[str]:
    """``digest`` of each event, from the payload tuples it hashes (zipped from a batch's
    columns), in one loop: no call per event."""
    encode, fresh = msgspec.json.encode, _DIGEST_HASH.copy
    digests: list[str] = []
    for payload in payloads:
        hashed = fresh()
        hashed.update(encode(payload))
        digests.append(hashed.hexdigest())
    return digests


class Prepared:
    """A batch with its events' columns (all but ``seq``, numbered under the store's lock)
    and what its dedupe needs, computed once, in its caller's thread."""

    __slots__ = ("accounts", "columns", "events", "id_hashes", "pairs")

    def __init__(self, events: Sequence[Event], hash_ids: IdHasher | None = None) -> None:
        self.events = events
        maps = [e.dimensions for e in events]
        # A map of one key (or none) is already in order: only a longer one is sorted.
        dims: list[Dims] = [
            tuple(m.items()) if len(m) < 2 else tuple(sorted(m.items())) for m in maps
        ]
        # A batch holds a few distinct tag sets, each a frozenset whose hash is kept: each is
        # sorted and given its id once per batch, not once per event.
        tag_sets = [e.tags for e in events]
        sorted_tags = {t: tuple(t) if len(t) < 2 else tuple(sorted(t)) for t in set(tag_sets)}
        tag_ids = {t: set_id(members) for t, members in sorted_tags.items()}
        tags: list[Tags] = list(map(sorted_tags.__getitem__, tag_sets))
        accounts = [e.account_id for e in events]
        ids = [e.id for e in events]
        metrics = [e.metric for e in events]
        ts = [e.ts_ms for e in events]
        billable = [e.billable for e in events]
        key_ids = [e.key_id for e in events]
        values = [float(e.value) for e in events]
        # A comprehension per column (faster than a tuple per event; encoded in one call).
        self.columns: dict[str, list[Any]] = {
            "account": accounts,
            "metric": metrics,
            "ts": ts,
            "id": ids,
            "key": [k or "" for k in key_ids],
            "billable": [1 if b else 0 for b in billable],
            "value": values,
            # As sent (a Map's order is not its identity); a mapping that is no dict, as one.
            "dims": [m if type(m) is dict else dict(m) for m in maps],
            "tags": tags,
            "dimset": list(map(set_id, dims)),
            "tagset": list(map(tag_ids.__getitem__, tag_sets)),
            "digest": _digests(
                zip(metrics, ts, values, billable, key_ids, dims, tags, strict=True)
            ),
        }
        self.pairs = set(zip(accounts, ids, strict=True))
        self.accounts = set(accounts)
        # The ids' hashes for the process's index of stored ids (chidindex.py), if it has one.
        self.id_hashes = None if hash_ids is None else hash_ids(ids)


class Group:
    """What one group commit's dedupe lookup asks: the ids of its batches, their accounts,
    and their distinct (account, id) pairs."""

    __slots__ = ("accounts", "id_hashes", "ids", "pairs")

    def __init__(self, batches: Sequence[Prepared]) -> None:
        self.ids = list(itertools.chain.from_iterable(b.columns["id"] for b in batches))
        # In the ids' order, or none when a batch has none.
        hashes = [b.id_hashes for b in batches if b.id_hashes is not None]
        self.id_hashes = hashes if len(hashes) == len(batches) else []
        self.pairs = (
            batches[0].pairs if len(batches) == 1 else set().union(*(b.pairs for b in batches))
        )
        # From each batch's accounts, a few: not from the group's 40,000 pairs (9 ms).
        self.accounts = sorted(set().union(*(b.accounts for b in batches)))


def sort_out(
    batches: Sequence[Prepared], stored: dict[tuple[str, str], str], distinct: int
) -> tuple[list[AppendResult], list[list[int] | None]]:
    """Each batch's answer, and which of its events are new (``None``: all of them).
    ``stored`` holds the digests found for the group's pairs (``distinct`` of them); it
    takes each new event's too, so that a later batch of the group (or a later event of one
    batch) repeating an id is a duplicate, as it would be had the batches been written one
    by one."""
    if not stored and distinct == sum(len(b.events) for b in batches):
        # The usual group: no id stored, none twice. Every event is new, taken whole (the
        # loop below cost a batch of 10,000 about 15 ms).
        return [AppendResult(len(b.events), 0) for b in batches], [None] * len(batches)
    results: list[AppendResult] = []
    picks: list[list[int] | None] = []
    for batch in batches:
        conflicts: list[int] = []
        new: list[int] = []
        columns = batch.columns
        for index, pair in enumerate(zip(columns["account"], columns["id"], strict=True)):
            e_digest = columns["digest"][index]
            earlier = stored.get(pair)
            if earlier is not None:
                if earlier != e_digest and earlier != digest_v1(batch.events[index]):
                    conflicts.append(index)
                continue
            stored[pair] = e_digest
            new.append(index)
        results.append(AppendResult(len(new), len(batch.events) - len(new), tuple(conflicts)))
        picks.append(new)
    return results, picks


def group_columns(
    batches: Sequence[Prepared], picks: Sequence[list[int] | None], first_seq: int
) -> dict[str, list[Any]]:
    """The new events' columns, batch after batch (``picks`` as ``sort_out`` gives them),
    numbered from ``first_seq``."""
    if len(batches) == 1 and picks[0] is None:
        columns = dict(batches[0].columns)
    else:
        columns = {name: [] for name in batches[0].columns}
        for batch, pick in zip(batches, picks, strict=True):
            for name, values in batch.columns.items():
                columns[name].extend(values if pick is None else [values[i] for i in pick])
    count = len(columns["id"])
    columns["seq"] = list(range(first_seq, first_seq + count))
    return columns


def token(columns: dict[str, list[Any]]) -> str:
    """An INSERT's dedupe token: it names exactly its new events, in order, so that should
    another process insert the same ones at the same moment (one batch retried at two
    processes, sent as it was), ClickHouse keeps one of the two inserts. In order rather
    than sorted: sorting a group's 40,000 (account, id, digest) triples cost more than its
    lookup (docs/clickhouse.md, "Ingest, round 8")."""
    named = (columns["account"], columns["id"], columns["digest"])
    return hashlib.blake2b(msgspec.json.encode(named), digest_size=16).hexdigest()
