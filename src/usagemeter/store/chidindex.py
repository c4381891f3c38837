"""The event ids a chDB database has stored, indexed in this process, so that a group commit
asks ClickHouse only about the ids it may have stored (none, in the usual batch of new ids).

Why it can be trusted: a chDB directory is open in one process at a time (a second process
fails to open it), and in that process every store on the directory shares one session
(chtransport._ChdbSession). Every write of an id into ``event_ids`` is therefore made by
this process, through a store that holds this index, and the index answers "never stored"
only for an id it has never been given. It is given:

- at open, every id of ``event_ids``, read page by page in a thread (the database stays
  usable meanwhile: until the index is complete, every lookup goes to ClickHouse as before);
- every id a group commit is about to INSERT, before the INSERT: an INSERT that fails may
  still have stored some of its parts (ClickHouse has no transactions), and an id added for
  nothing only costs a lookup, where one left out would be stored twice;
- an amend's replacement id, likewise before its INSERT.

Nothing is ever taken out: an account's deletion (its ids leave ``event_ids``) or a TRUNCATE
leaves ids here that are no longer stored, which only costs their lookup. The index holds
ids, not (account, id) pairs: the same id in two accounts is one entry, again at most a
lookup for nothing, and its build reads the id column alone.

The structure: Python's 64-bit hash of each id (siphash, cached on the string, the same in
this process only, and the index lives in this process only) in a numpy hash table, open
addressing with linear probing, at most half full, probed for a whole batch at once by
vectorised steps: 10,000 ids asked in about 1 ms at 10M ids, where a binary search in
sorted arrays took 6 to 11 (docs/clickhouse.md, "Ingest, round 17"). A hash shared by two
ids makes one of them a "maybe": a lookup, never a wrong answer. 16 to 32 bytes per id (the
table doubles when half full): 256 MB at 10M ids; past MAX_IDS the index is dropped and
every lookup goes to ClickHouse, as on a server (the HTTP transport never has one: other
processes write there too).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from usagemeter.store.chschema import ids_by_id
from usagemeter.store.chtransport import ChdbTransport, Transport, literal

# Ids indexed at most: a table of 2**27 slots (1 GiB); past it, the lookups of before.
MAX_IDS = 2**26
# Empty slots hold 0; an id whose hash is 0 is noted as 1 (at worst a lookup for nothing).
_EMPTY = 0
# Ids read per statement while building: each statement holds the session (a chDB session
# runs one statement at a time), so an append waits for one page at most.
BUILD_PAGE = 200_000
_FIRST_SLOTS = 1 << 16

Hashes = npt.NDArray[np.int64]


def id_hashes(ids: Sequence[str]) -> Hashes:
    """The index's hash of each id. Made for each batch in its caller's thread
    (chappend.Prepared): a group's 40,000 hashed in the writer held the GIL that the
    callers' threads want, where the lookup it spares let them run (docs/clickhouse.md,
    "Ingest, round 17: the stored ids indexed in the process")."""
    hashes = np.fromiter(map(hash, ids), np.int64, len(ids))
    hashes[hashes == _EMPTY] = 1
    return hashes


class _Table:
    """A set of nonzero 64-bit hashes: open addressing, linear probing, every step of a
    batch's probes one numpy operation over the batch's ids still probing."""

    def __init__(self, slots: int = _FIRST_SLOTS) -> None:
        self.slots = np.zeros(slots, np.int64)
        self.mask = slots - 1
        self.count = 0

    def add(self, hashes: Hashes) -> None:
        hashes = np.unique(hashes)
        self.reserve(self.count + len(hashes))
        self._place(hashes)

    def reserve(self, count: int) -> None:
        """Room for ``count`` hashes at most half full: a build sized by the table's rows
        first doubles no table."""
        if count * 2 > len(self.slots):
            size = len(self.slots)
            while count * 2 > size:
                size *= 2
            held = self.slots[self.slots != _EMPTY]
            self.slots, self.mask, self.count = np.zeros(size, np.int64), size - 1, 0
            self._place(held)

    def _place(self, hashes: Hashes) -> None:
        """Each of ``hashes`` (distinct) in its slot or the next free one; one already held
        is left. Two of the batch probing the same free slot: the first takes it, the other
        probes on."""
        slots, mask = self.slots, self.mask
        at = hashes & mask
        while len(hashes):
            held = slots[at]
            free = np.flatnonzero(held == _EMPTY)
            _, first = np.unique(at[free], return_index=True)
            taken = free[first]
            slots[at[taken]] = hashes[taken]
            self.count += len(taken)
            probing = held != hashes
            probing[taken] = False
            hashes, at = hashes[probing], (at[probing] + 1) & mask

    def contains(self, hashes: Hashes) -> npt.NDArray[np.bool_]:
        slots, mask = self.slots, self.mask
        found = np.zeros(len(hashes), dtype=bool)
        which = np.arange(len(hashes))
        at = hashes & mask
        while len(which):
            held = slots[at]
            hit = held == hashes
            found[which[hit]] = True
            probing = ~hit & (held != _EMPTY)
            which, hashes, at = which[probing], hashes[probing], (at[probing] + 1) & mask
        return found


class IdIndex:
    """The ids stored in one database of one chDB session (see the module's docstring).
    Safe to share between threads and stores."""

    def __init__(self, complete: bool) -> None:
        self._lock = threading.Lock()
        self._table = _Table()
        self.complete = complete
        self.dropped = False  # past MAX_IDS: never complete again
        self._users = 0
        self._builder: threading.Thread | None = None
        self._stop = threading.Event()

    def __len__(self) -> int:
        return self._table.count

    def nbytes(self) -> int:
        return int(self._table.slots.nbytes)

    def add(self, ids: Sequence[str], hashes: Sequence[Hashes] = ()) -> None:
        """Note ``ids`` as maybe stored (before the INSERT that stores them); ``hashes``,
        their id_hashes if already made, in pieces in the ids' order."""
        if hashes:
            self._add(np.concatenate(hashes))
        elif ids:
            self._add(id_hashes(ids))

    def _add(self, hashes: Hashes) -> None:
        with self._lock:
            if self.dropped:
                return
            if self._table.count + len(hashes) > MAX_IDS:
                self._table = _Table(1)  # its memory freed
                self.dropped, self.complete = True, False
                return
            self._table.add(hashes)

    def maybe_stored(self, ids: Sequence[str], hashes: Sequence[Hashes] = ()) -> list[str] | None:
        """Those of ``ids`` that may be stored (an empty list: none is), or None when the
        index cannot tell (not built yet, or dropped): then every id is to be looked up."""
        if not self.complete:
            return None
        asked = np.concatenate(hashes) if hashes else id_hashes(ids)
        with self._lock:
            if not self.complete:
                return None
            found = self._table.contains(asked)
        if not found.any():
            return []
        return [ids[i] for i in np.flatnonzero(found).tolist()]

    # ------------------------------------------------------------------ build and users

    def attach(self, transport: ChdbTransport) -> None:
        """A store opened on the database: the first one starts the build (on a transport
        of its own, so that the session stays open while it reads)."""
        with self._lock:
            self._users += 1
            if self.complete or self.dropped or self._builder is not None:
                return
            self._stop.clear()
            reader = ChdbTransport(transport._shared.path, transport.database)
            self._builder = threading.Thread(
                target=self._build, args=(reader,), name="event-ids-index", daemon=True
            )
        self._builder.start()

    def detach(self) -> None:
        """A store closed: the last one stops the build (its next page is not read) and
        waits for it, so that the session can close; the index stays incomplete and a store
        opened later builds it again."""
        with self._lock:
            self._users -= 1
            builder = self._builder if self._users == 0 else None
        if builder is not None:
            self._stop.set()
            builder.join()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the index is complete, once its build has ended (or ``timeout`` passed)."""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)
        return self.complete

    def _build(self, reader: ChdbTransport) -> None:
        try:
            self._read_pages(reader)
        except Exception:  # the index stays incomplete: every lookup to ClickHouse, as before
            pass
        finally:
            reader.close()
            with self._lock:
                self._builder = None

    def _read_pages(self, reader: Transport) -> None:
        """Every id of event_ids, in pages by the table's key, added as they are read;
        complete after the last page unless stopped. An id stored meanwhile by this process
        is added by its writer, so the union holds every id stored."""
        by_id = ids_by_id(reader)
        if by_id is None:  # no table yet: nothing stored
            self._finish()
            return
        key = "id" if by_id else "account, id"
        rows = int(reader.query("SELECT count() FROM event_ids")[0][0])
        with self._lock:
            if rows <= MAX_IDS:
                self._table.reserve(self._table.count + rows)
        after = ""
        while not self._stop.is_set():
            condition = f"WHERE ({key}) > ({after}) " if after else ""
            columns = reader.query_columns(
                f"SELECT {key} FROM event_ids {condition}ORDER BY {key} LIMIT {BUILD_PAGE}"
            )
            page: list[Any] = columns[-1] if columns else []
            if page:
                self._add(id_hashes(page))
            if len(page) < BUILD_PAGE:
                self._finish()
                return
            after = ", ".join(literal(column[-1]) for column in columns)

    def _finish(self) -> None:
        with self._lock:
            if not self.dropped and not self._stop.is_set():
                self.complete = True


_INDEXES: weakref.WeakKeyDictionary[Any, dict[str, IdIndex]] = weakref.WeakKeyDictionary()
_INDEXES_LOCK = threading.Lock()


def index_for(transport: Transport, fresh: bool) -> IdIndex | None:
    """The index of the transport's database, shared by every store on its chDB session
    (attached: ``release`` it at close), built unless ``fresh`` (the store has just created
    the database's tables: nothing is stored). None for a transport that other processes
    may write through (HTTP)."""
    if not isinstance(transport, ChdbTransport):
        return None
    with _INDEXES_LOCK:
        databases = _INDEXES.setdefault(transport._shared, {})
        index = databases.get(transport.database)
        if index is None:
            index = databases[transport.database] = IdIndex(complete=fresh)
    index.attach(transport)
    return index
