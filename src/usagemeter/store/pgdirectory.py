"""Accounts and keys as a request read them, kept by one PostgreSQL process between requests,
and exact across processes: a key revoked or an account changed through any process is seen
by the next request of every process.

Every change to ``accounts`` or ``keys`` moves ``directory_version`` on, in its own
transaction (a trigger, pgschema.py): the version names the last committed change. A
request's key lookup, which no request skips, reads the version in the same statement
(``saw``). What the request asks next about an account, its tree or a key is answered from
what this process read before at that same version, when it did: the database held exactly
that then, and still did at this request's lookup. Otherwise the store reads it, with the
version beside it, and keeps it. Three round trips of a question (the key, the account, its
tree) become one, the one that checks the key.

Only the context that looked the key up (an asyncio task: one request) answers from what is
kept, and only as of its own lookup; a change this process makes starts every such context
over (``changed``), so a request sees its own writes. A caller that never looks a key up
(the CLI, the write path's threads) always reads the database.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Final

# The version in a select list: one row always (pgschema.py), unless the table was emptied
# by hand, when it is NULL and nothing is answered from memory until the next change.
VERSION = "(SELECT v FROM directory_version)"
MISS: Final = object()  # what get returns when the database must be asked

# (the directory's identity, the version seen, this process's changes until then)
_SEEN: ContextVar[tuple[object, int, int] | None] = ContextVar(
    "usagemeter_pg_directory", default=None
)


class Directory:
    """What one store handle read of accounts and keys, by (kind, id), with the version it
    read them at."""

    SIZE = 10_000  # entries; past it the memory starts again

    def __init__(self) -> None:
        self._changes = 0
        self._entries: dict[tuple[str, str], tuple[int, Any]] = {}

    def saw(self, version: int | None) -> None:
        """This context's key lookup read the directory at ``version``."""
        _SEEN.set(None if version is None else (self, version, self._changes))

    def changed(self) -> None:
        """This process changed accounts or keys (or is about to): nothing is answered from
        memory until the next lookup, in any context."""
        self._changes += 1
        _SEEN.set(None)

    def get(self, kind: str, ident: str) -> Any:
        """What was read of ``ident`` at the version this context's lookup saw, or MISS."""
        seen = _SEEN.get()
        if seen is None or seen[0] is not self or seen[2] != self._changes:
            return MISS
        entry = self._entries.get((kind, ident))
        if entry is None or entry[0] != seen[1]:
            return MISS
        return entry[1]

    def put(self, kind: str, ident: str, version: int | None, value: Any) -> None:
        """``value`` (immutable) was read of ``ident`` at ``version``."""
        if version is None:
            return
        if len(self._entries) >= self.SIZE:
            self._entries = {}
        self._entries[(kind, ident)] = (version, value)
