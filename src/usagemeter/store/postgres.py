"""The PostgreSQL adapter: any number of usagemeter processes over one shared database (its
tables: pgschema.py; its queries: sqlplan.py in the PostgreSQL dialect).

The promises are the SQLite store's, kept across processes by the database itself:

- A batch is one transaction; ``synchronous_commit = on`` for every connection, so
  ``append`` returns only after the commit is durable. Its events wait in ``unfolded``
  until a folder thread moves them into the rollups (pgfold.py); every query reads the
  rollups and what waits together, in one statement.
- An (account, id) counts once, forever: ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` into
  ``event_ids`` tells which events of a batch are new, and when two processes get the same
  batch at once, the second waits on the first's rows and then finds them taken.
- Ids are inserted in key order, so concurrent batches lock rows in the same order and do
  not deadlock; a deadlock or serialization failure is retried anyway.
- Nothing that can change is cached: a key revoked by one process is refused by every
  process at its next request. Only what never changes is kept: the row ids of accounts,
  keys and interned names (metrics, dimension and tag sets), once committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.types.numeric import Int8BinaryDumper
from psycopg_pool import ConnectionPool

from usagemeter.model import Account, ApiKey, AppendResult, Event, PortalToken
from usagemeter.store import pgarrays, portalrows, redact
from usagemeter.store.base import AggregateRow, AggregateSpec, Conflict, NotFound, UnstorableText
from usagemeter.store.limitstore import LIMIT_SCHEMA, LimitTables, Run
from usagemeter.store.pgcommit import GroupCommit
from usagemeter.store.pgdirectory import MISS, VERSION, Directory
from usagemeter.store.pgfold import FOLD_SQL, Folder, fold
from usagemeter.store.pgschema import (
    FOLD_LOCK,
    ROLLUPS,
    ensure_partitions,
    events_partitions,
    floor_div,
    fold_into,
    fold_values,
    migrate,
    month_bounds,
)
from usagemeter.store.rows import (
    ACCOUNT_COLUMNS,
    ACCOUNT_SELECT,
    KEY_COLUMNS,
    KEY_SELECT,
    account_from_row,
    account_values,
    key_from_row,
    key_values,
    row_ids_stale,
)
from usagemeter.store.sqlite import NO_KEY
from usagemeter.store.sqlplan import (
    DAY_MS,
    HOUR_MS,
    POSTGRES,
    event_from_row,
    plan_aggregate,
    plan_export,
    plan_touched,
    run_plans,
)
from usagemeter.store.voidsql import VOID_SCHEMA, SqlCorrections

log = logging.getLogger("usagemeter")
Conn = psycopg.Connection[tuple[Any, ...]]
RETRIES = 5  # attempts at a batch that lost a deadlock or serialization race
DEFAULT_POOL_SIZE = 10  # connections per process; see docs/scaling.md
# What one batch of a group can bring on itself; the others are then written without it.
_REFUSALS = (NotFound, ValueError, psycopg.DataError)
# At most this many events of concurrent batches in one statement. Not more: a group that
# takes every client's batch leaves the database idle while they all send their next one
# (one server, 4 clients, batches of 1,000: 7,364 and 4,274 events/s with 5,000 here,
# 8,408 and 7,791 with 2,000; bench/two_servers.py --live 10).
GROUP_EVENTS = 2_000
# Groups written at once by one process: two keep two backends busy. (Chosen when batches
# still upserted the rollups, and waited on each other's rows; bench.run's
# 1M ingest, 4 clients, beside the store without groups: one writer, 10,258 events/s
# against 18,597; two, 11,506 against 12,820; the machine's load moved between the pairs.)
GROUP_WRITERS = 2
CLOSE_FOLD_SECONDS = 2.0  # at most this long waiting for a connection to fold on close
DIGEST_BYTES = 16  # an event's payload digest (_digest)
Dims = tuple[tuple[str, str], ...]  # an event's dimensions as sorted pairs: a cache key
Name = TypeVar("Name", str, Dims, frozenset[str])

# A batch in one statement, its columns sent as binary arrays, each packed in one go
# (pgarrays.py; text arrays cost the client ten times more: each element is searched for
# characters to quote). `input` is the batch
# less its in-batch repeats, in key order; `fresh` the ids never seen before (the unique key
# makes a racing twin wait, then skip); their events follow, numbered (seq) in the batch's
# order, and wait in `unfolded` for the folder (pgfold.py): a batch inserts only, so no
# writer waits on another's rows. The answer: the candidates that were not fresh, with the
# digest this statement's snapshot holds for each.
APPEND_SQL = (
    "WITH input (account, metric, ts, event_id, key, billable, dimset, tagset, value, digest,"
    " ord) AS (SELECT * FROM unnest(%b::bigint[], %b::int[], %b::bigint[], %b::text[],"
    " %b::bigint[], %b::int2[], %b::int[], %b::int[], %b::float8[], %b::bytea[], %b::int[])),"
    " fresh AS (INSERT INTO event_ids (account, event_id, digest)"
    " SELECT account, event_id, digest FROM input ORDER BY account, event_id"
    " ON CONFLICT DO NOTHING RETURNING account, event_id),"
    " new AS (SELECT input.* FROM input JOIN fresh USING (account, event_id)),"
    " stored AS (INSERT INTO events (account, metric, ts, event_id, key, billable, dimset,"
    " tagset, value) SELECT account, metric, ts, event_id, key, billable, dimset, tagset, value"
    " FROM new ORDER BY ord"
    " RETURNING account, metric, ts, seq, key, billable, dimset, tagset, value),"
    " waiting AS (INSERT INTO unfolded (account, metric, ts, seq, key, billable, dimset, tagset,"
    " value) SELECT * FROM stored)"
    " SELECT i.account, i.event_id, e.digest FROM input i"
    " LEFT JOIN event_ids e ON e.account = i.account AND e.event_id = i.event_id"
    " WHERE NOT EXISTS (SELECT 1 FROM fresh f"
    " WHERE f.account = i.account AND f.event_id = i.event_id)"
)


class _NumberLoader(Loader):
    """numeric as int or float: sum() of a bigint column is numeric, and the store's
    values are plain Python numbers, as SQLite returns them."""

    def load(self, data: Buffer) -> int | float:
        text = bytes(data).decode()
        try:
            return int(text)
        except ValueError:
            return float(text)


def _configure(conn: Conn) -> None:
    # Durable before acknowledged, whatever the server's default says.
    conn.execute("SET synchronous_commit = on")
    # A prepared statement keeps one plan: the batch statement took 10 ms to plan and under
    # 1 ms to run; a question's planning cost as much as its run (see aggregate).
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.adapters.register_loader("numeric", _NumberLoader)
    # A binary list of ints is bigint[] whatever its values, so the batch statement keeps
    # one set of parameter types and one prepared plan (else int2[] or int4[] by the batch).
    conn.adapters.register_dumper(int, Int8BinaryDumper)
    pgarrays.register(conn)


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


# One encoder for every digest and canonical text: json.dumps with options builds a new
# encoder per call, which cost more than the encoding itself. The output is the same.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_ENCODE_SORTED = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def _digest(event: Event, tail: str | None = None) -> bytes:
    """What identifies an event's payload, to tell a retry from a conflicting reuse of an id:
    the compact JSON of [metric, ts, value, billable, key, sorted dimension pairs, sorted
    tags]. ``tail`` is _digest_tail of its dimensions and tags, when known: many events
    share them, and their text costs more than the rest's.

    The text is json's, written by hand where that is quicker and the same: the metric's and
    the key's JSON are kept (a batch repeats them), a finite float or an int is its repr,
    as json writes it (the encoder's own call cost as much as the rest of the digest)."""
    if tail is None:
        tail = _digest_tail(tuple(sorted(event.dimensions.items())), event.tags)
    value = event.value
    if (type(value) is float and math.isfinite(value)) or type(value) is int:
        value_text = repr(value)
    else:
        value_text = _ENCODE(value)  # NaN, infinities, anything else: as json writes them
    head = (
        f"[{_json_text(event.metric)},{event.ts_ms},{value_text},"
        f"{'true' if event.billable else 'false'},{_json_text(event.key_id)}"
    )
    return hashlib.blake2b((head + tail).encode(), digest_size=DIGEST_BYTES).digest()


_JSON_TEXTS: dict[str | None, str] = {}
_JSON_TEXTS_KEPT = 10_000  # metric names and key ids: few, but a client names them


def _json_text(text: str | None) -> str:
    found = _JSON_TEXTS.get(text)
    if found is None:
        if len(_JSON_TEXTS) >= _JSON_TEXTS_KEPT:
            _JSON_TEXTS.clear()
        found = _JSON_TEXTS[text] = _ENCODE(text)
    return found


def _digest_tail(dims: Dims, tags: frozenset[str]) -> str:
    """The end of a digest's JSON text: ``,<dimension pairs>,<tags>]``."""
    return "," + _ENCODE([dims, sorted(tags)])[1:]


def _refuse_nul(events: Sequence[Event]) -> None:
    """PostgreSQL text cannot hold U+0000: say which event and field, before anything is
    stored (the API answers a ValueError with a 400), instead of failing mid-batch."""
    for index, e in enumerate(events):
        # One look per event at all its texts; the field is looked for only when found.
        if "\x00" not in "".join(
            (e.id, e.account_id, e.key_id or "", *e.dimensions.values(), *e.tags)
        ):
            continue
        texts = [("id", e.id), ("account", e.account_id), ("key", e.key_id or "")]
        texts += [(f"dimensions.{k}", v) for k, v in e.dimensions.items()]
        texts += [("tags", tag) for tag in e.tags]
        for field, text in texts:
            if "\x00" in text:
                raise ValueError(
                    f"event {index}: {field}: contains a NUL character (U+0000), which this"
                    " store cannot keep; remove it"
                )


def _canon(value: Any) -> str:
    return _ENCODE_SORTED(value)


def _per_batch(
    batches: Sequence[Sequence[Event]], repeats: Sequence[int], conflicts: Sequence[int]
) -> list[AppendResult]:
    """Each batch's result, from the indexes (over the batches as one) of the events that
    were duplicates and of those that were conflicts too (sorted)."""
    results = []
    low = 0
    for batch in batches:
        high = low + len(batch)
        duplicates = sum(1 for i in repeats if low <= i < high)
        own = tuple(i - low for i in conflicts if low <= i < high)
        results.append(AppendResult(len(batch) - duplicates, duplicates, own))
        low = high
    return results


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as one list per column, for unnest()."""
    return [[row[i] for row in rows] for i in range(width)]


class PostgresStore(SqlCorrections, LimitTables):
    """The shared store on one PostgreSQL database. Safe to share between threads, and any
    number of processes may open the same database."""

    def __init__(
        self, url: str, pool_size: int = DEFAULT_POOL_SIZE, *, background_fold: bool = True
    ) -> None:
        """``background_fold``: fold waiting events in a thread of this process (else only
        when ``fold`` is called, or by another process: the tests choose when)."""
        # One direct connection first: a wrong URL fails here at once with the server's
        # reason, instead of in a pool that retries in the background.
        try:
            conn = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"cannot connect to {redact(url)}: {exc}") from None
        with conn:
            migrate(conn)
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            configure=_configure,
            open=True,
        )
        self._create_limit_tables()
        self._metric_ids: dict[str, int] = {}
        self._dimset_ids: dict[Dims, int] = {}
        self._tagset_ids: dict[frozenset[str], int] = {}
        self._directory = Directory()  # accounts and keys as requests read them
        self._account_rids: dict[str, int] = {}
        self._key_rids: dict[str, int] = {}
        self._row_ids_since = time.monotonic()  # see rows.ROW_IDS_KEPT_FOR
        self._partitions: set[tuple[str, int, int]] = set()
        self._days: set[int] = set()  # UTC days whose month has its partition
        self._group_commit: GroupCommit[Sequence[Event], AppendResult] = GroupCommit(
            self._write_group, GROUP_EVENTS, GROUP_WRITERS
        )
        self._appended = False  # since this handle's last fold: close folds once more
        self._folder = Folder(self.fold) if background_fold else None

    def fold(self, wait: bool = False, timeout: float | None = None) -> int | None:
        """Move the events waiting in ``unfolded`` (any process's) into the rollups: how
        many, or None when another fold holds the lock and ``wait`` is false. Queries never
        need it (they read what waits); it keeps what they read short. ``timeout``: seconds
        to wait for a connection (the pool's default, 30, when None)."""
        self._appended = False
        kwargs = {} if timeout is None else {"timeout": timeout}
        with self._pool.connection(**kwargs) as conn:
            return fold(conn, wait)

    def close(self) -> None:
        if self._folder is not None:
            self._folder.stop()
        if self._appended:
            # Leave nothing waiting that this process wrote; not for long if the database
            # is gone (its events wait, and any process folds them later).
            try:
                self.fold(wait=True, timeout=CLOSE_FOLD_SECONDS)
            except psycopg.Error:
                log.exception("folding the PostgreSQL rollups on close failed; they wait")
        self._pool.close()

    @contextmanager
    def _connection(self) -> Iterator[Conn]:
        """A pooled connection; a text with a NUL character, which PostgreSQL cannot hold
        (psycopg refuses to send it), is UnstorableText rather than the driver's error."""
        with self._pool.connection() as conn:
            try:
                yield conn
            except psycopg.DataError as exc:
                if "NUL" not in str(exc):
                    raise
                raise UnstorableText(
                    "a text sent contains a NUL character (U+0000), which this store cannot"
                    " hold: remove it"
                ) from None

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as conn:
            return conn.execute(sql, params).fetchall()

    # ---------------------------------------------------------------- accounts

    def _rid(self, conn: Conn, table: str, noun: str, ident: str) -> int:
        row = conn.execute(f"SELECT rid FROM {table} WHERE id = %s", (ident,)).fetchone()
        if row is None:
            raise NotFound(f"{noun} {ident!r} does not exist")
        return int(row[0])

    def _insert_under(
        self,
        table: str,
        columns: str,
        owner: str | None,
        values: Callable[[int | None], tuple[Any, ...]],
        taken: str,
    ) -> None:
        """Insert a row naming an account (its ``owner``, by row id) that must exist;
        Conflict saying ``taken`` when its id is."""
        with self._connection() as conn, conn.transaction():
            rid = None if owner is None else self._rid(conn, "accounts", "account", owner)
            row = values(rid)
            marks = ", ".join(["%s"] * len(row))
            try:
                conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", row)
            except errors.UniqueViolation as exc:
                raise Conflict(taken) from exc

    def create_account(self, account: Account) -> Account:
        # A deleted account's id may come back as a new row (delete_account).
        self._account_rids.pop(account.id, None)
        self._directory.changed()
        try:
            self._insert_under(
                "accounts",
                ACCOUNT_COLUMNS,
                account.parent_id,
                lambda parent: account_values(account, parent),
                f"account id {account.id!r} is already taken",
            )
        finally:
            self._directory.changed()
        return self.get_account(account.id)

    # The same columns, joins and row shapes as the SQLite store; what a request reads
    # of one account, its tree or one key is kept as pgdirectory.py says.

    def get_account(self, account_id: str) -> Account:
        found = self._directory.get("account", account_id)
        if found is not MISS:
            return found  # type: ignore[no-any-return]
        rows = self._rows(f"SELECT {VERSION}, {ACCOUNT_SELECT} WHERE a.id = %s", (account_id,))
        if not rows:
            raise NotFound(f"account {account_id!r} does not exist")
        account = account_from_row(rows[0][1:])
        self._directory.put("account", account_id, rows[0][0], account)
        return account

    def list_accounts(self) -> list[Account]:
        rows = self._rows(f"SELECT {ACCOUNT_SELECT} ORDER BY a.rid")
        return [account_from_row(row) for row in rows]

    def _tree(self, account_id: str, kind: str, join: str) -> list[str]:
        found = self._directory.get(kind, account_id)
        if found is not MISS:
            return list(found)
        rows = self._rows(
            f"""WITH RECURSIVE tree(rid, id, parent, depth) AS (
                SELECT rid, id, parent, 0 FROM accounts WHERE id = %s
                UNION ALL
                SELECT a.rid, a.id, a.parent, tree.depth + 1 FROM accounts a JOIN tree ON {join}
            ) SELECT id, {VERSION} FROM tree ORDER BY depth, rid""",
            (account_id,),
        )
        if not rows:
            raise NotFound(f"account {account_id!r} does not exist")
        tree = [row[0] for row in rows]
        self._directory.put(kind, account_id, rows[0][1], tuple(tree))
        return tree

    def descendants(self, account_id: str) -> list[str]:
        return self._tree(account_id, "descendants", "a.parent = tree.rid")

    def ancestors(self, account_id: str) -> list[str]:
        return self._tree(account_id, "ancestors", "a.rid = tree.parent")

    # -------------------------------------------------------------------- keys

    def create_key(self, key: ApiKey, secret_hash: bytes) -> ApiKey:
        self._key_rids.pop(key.id, None)
        self._directory.changed()
        try:
            self._insert_under(
                "keys",
                KEY_COLUMNS,
                key.account_id,
                lambda account: key_values(key, account, secret_hash),
                f"key id {key.id!r} is already taken",
            )
        finally:
            self._directory.changed()
        return self.get_key(key.id)

    def get_key(self, key_id: str) -> ApiKey:
        found = self._directory.get("key", key_id)
        if found is not MISS:
            return found  # type: ignore[no-any-return]
        rows = self._rows(f"SELECT {VERSION}, {KEY_SELECT} WHERE k.id = %s", (key_id,))
        if not rows:
            raise NotFound(f"key {key_id!r} does not exist")
        key = key_from_row(rows[0][1:])
        self._directory.put("key", key_id, rows[0][0], key)
        return key

    def find_keys_by_lookup(self, lookup: bytes) -> list[tuple[ApiKey, bytes]]:
        # Always asked of the database (a key revoked anywhere is refused at once), with the
        # directory's version in the same statement: one row even when no key matches.
        rows = self._rows(
            f"SELECT {VERSION}, r.* FROM (VALUES (1)) one"
            f" LEFT JOIN (SELECT {KEY_SELECT} WHERE k.lookup = %s) r ON true",
            (lookup,),
        )
        self._directory.saw(rows[0][0])
        return [(key_from_row(row[1:]), bytes(row[8])) for row in rows if row[1] is not None]

    def list_keys(self, account_id: str | None) -> list[ApiKey]:
        if account_id is None:
            sql = f"SELECT {KEY_SELECT} WHERE k.account IS NULL ORDER BY k.rid"
            rows = self._rows(sql)
        else:
            sql = f"SELECT {KEY_SELECT} WHERE a.id = %s ORDER BY k.rid"
            rows = self._rows(sql, (account_id,))
        return [key_from_row(row) for row in rows]

    def export_keys(self) -> list[tuple[ApiKey, bytes]]:
        rows = self._rows(f"SELECT {KEY_SELECT} ORDER BY k.rid")
        return [(key_from_row(row), bytes(row[7])) for row in rows]

    def revoke_key(self, key_id: str) -> ApiKey:
        self._directory.changed()
        try:
            with self._connection() as conn:
                cur = conn.execute(
                    "UPDATE keys SET revoked_at = coalesce(revoked_at, %s) WHERE id = %s",
                    (_now_ms(), key_id),
                )
                if cur.rowcount == 0:
                    raise NotFound(f"key {key_id!r} does not exist")
        finally:
            self._directory.changed()
        return self.get_key(key_id)

    # ------------------------------------------------------------------ events

    def _intern(
        self,
        conn: Conn,
        cache: dict[Name, int],
        names: Iterable[Name],
        text: Callable[[Name], str],
        insert: str,
        select: str,
    ) -> None:
        """Give every name an id, committed at once by whichever process comes first, so a
        batch's transaction never waits on another's new names. The cache is keyed by the
        name as Python holds it (a set of tags, a tuple of dimension pairs), so that a known
        name costs a dictionary probe, not its canonical text."""
        missing = {name: text(name) for name in set(names) if name not in cache}
        if not missing:
            return
        texts = sorted(set(missing.values()))
        with conn.transaction():
            conn.execute(insert, (texts,))
            ids: dict[str, int] = dict(conn.execute(select, (texts,)).fetchall())
        cache.update((name, ids[t]) for name, t in missing.items())

    def _intern_all(
        self, conn: Conn, events: Sequence[Event]
    ) -> tuple[list[Dims], list[frozenset[str]]]:
        """Intern the batch's metrics, dimension sets and tag sets; the keys of each event's
        dimension and tag sets in the caches."""
        dims = [tuple(sorted(e.dimensions.items())) for e in events]
        tags = [e.tags for e in events]
        self._intern(
            conn,
            self._metric_ids,
            (e.metric for e in events),
            str,
            "INSERT INTO metrics (name) SELECT * FROM unnest(%s::text[]) ON CONFLICT DO NOTHING",
            "SELECT name, id FROM metrics WHERE name = ANY(%s)",
        )
        self._intern(
            conn,
            self._dimset_ids,
            dims,
            lambda pairs: _canon(dict(pairs)),
            "INSERT INTO dimsets (canon, dims) SELECT c, c::jsonb FROM unnest(%s::text[]) c"
            " ON CONFLICT DO NOTHING",
            "SELECT canon, id FROM dimsets WHERE canon = ANY(%s)",
        )
        self._intern(
            conn,
            self._tagset_ids,
            tags,
            lambda names: _canon(sorted(names)),
            # A new tag set's tags are listed in the same statement, so they never lag it.
            "WITH new AS (INSERT INTO tagsets (tags) SELECT * FROM unnest(%s::text[])"
            " ON CONFLICT DO NOTHING RETURNING id, tags)"
            " INSERT INTO tagset_tags (tag, tagset)"
            " SELECT t, new.id FROM new, jsonb_array_elements_text(new.tags::jsonb) t",
            "SELECT tags, id FROM tagsets WHERE tags = ANY(%s)",
        )
        return dims, tags

    def _ensure_partitions(self, conn: Conn, events: Sequence[Event]) -> None:
        """The monthly partitions of the batch's events, known by UTC day: a day's integer
        division costs far less than a month's calendar arithmetic per event."""
        days = {e.ts_ms // DAY_MS for e in events} - self._days
        if not days:
            return
        months = {month_bounds(day * DAY_MS) for day in days} - self._partitions
        if months:
            ensure_partitions(conn, months)
            self._partitions |= months
        self._days |= days

    def append(self, events: Sequence[Event]) -> AppendResult:
        if not events:
            return AppendResult(0, 0)
        # Refused before it joins a group, so that it fails alone, saying which event.
        _refuse_nul(events)
        return self._group_commit.submit(events, len(events))

    def _write_group(self, batches: Sequence[Sequence[Event]]) -> list[AppendResult | Exception]:
        """The batches of one group in one transaction, or each alone when one of them is
        refused (it names an account that does not exist, say), so that the error is that
        batch's own. Any other error (the database gone) is every batch's."""
        self._appended = True
        if self._folder is not None:
            self._folder.wake()
        if len(batches) > 1:
            try:
                return list(self._write_retrying(batches))
            except _REFUSALS:
                pass
        outcomes: list[AppendResult | Exception] = []
        for batch in batches:
            try:
                outcomes.extend(self._write_retrying([batch]))
            except _REFUSALS as exc:
                outcomes.append(exc)
        return outcomes

    def _write_retrying(self, batches: Sequence[Sequence[Event]]) -> list[AppendResult]:
        for attempt in range(1, RETRIES + 1):
            try:
                with self._connection() as conn:
                    return self._append(conn, batches)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == RETRIES:
                    raise
                log.warning("%s batch(es) lost a lock race; retrying", len(batches))
        raise AssertionError("unreachable")

    def _append(self, conn: Conn, batches: Sequence[Sequence[Event]]) -> list[AppendResult]:
        """Store the batches, in order, as one: a later batch's repeat of an earlier one's
        id is its duplicate, as if the earlier had committed first."""
        events = [e for batch in batches for e in batch]
        accounts, keys = self._resolve(conn, events)
        dims, tags = self._intern_all(conn, events)
        self._ensure_partitions(conn, events)

        # The first event of each (account, id) is the candidate; a later one is a
        # duplicate, and a conflict when its payload differs. Candidates go as one list per
        # column, for unnest(). Indexes run over the batches as one.
        first: dict[tuple[int, str], bytes] = {}
        index_of: dict[tuple[int, str], int] = {}
        candidates: list[int] = []
        account_column: list[int] = []
        digests: list[bytes] = []
        repeats: list[int] = []
        conflicts: list[int] = []
        tails: dict[tuple[Dims, frozenset[str]], str] = {}
        for index, e in enumerate(events):
            account = accounts[e.account_id]
            names = (dims[index], tags[index])
            tail = tails.get(names)
            if tail is None:
                tail = tails[names] = _digest_tail(*names)
            digest = _digest(e, tail)
            earlier = first.get((account, e.id))
            if earlier is not None:
                repeats.append(index)
                if earlier != digest:
                    conflicts.append(index)
                continue
            first[(account, e.id)] = digest
            index_of[(account, e.id)] = index
            candidates.append(index)
            account_column.append(account)
            digests.append(digest)
        metric_ids, dimset_ids, tagset_ids = self._metric_ids, self._dimset_ids, self._tagset_ids
        chosen = [events[i] for i in candidates]
        columns = [
            pgarrays.numbers("int8", account_column),
            pgarrays.numbers("int4", [metric_ids[e.metric] for e in chosen]),
            pgarrays.numbers("int8", [e.ts_ms for e in chosen]),
            pgarrays.texts([e.id for e in chosen]),
            pgarrays.numbers(
                "int8", [NO_KEY if e.key_id is None else keys[e.key_id] for e in chosen]
            ),
            pgarrays.numbers("int2", [1 if e.billable else 0 for e in chosen]),
            pgarrays.numbers("int4", [dimset_ids[dims[i]] for i in candidates]),
            pgarrays.numbers("int4", [tagset_ids[tags[i]] for i in candidates]),
            pgarrays.numbers("float8", [e.value for e in chosen]),
            pgarrays.fixed_bytes(digests, DIGEST_BYTES),
            pgarrays.numbers("int4", candidates),
        ]
        # One statement, so one round trip and its own transaction: the new ids, their
        # events and every rollup. It answers, for each candidate already known, the digest
        # stored for it (NULL for a new one).
        # Prepared: its plan does not depend on the batch, and planning it cost ten times
        # what running it costs for a small batch.
        known = conn.execute(APPEND_SQL, columns, prepare=True).fetchall()
        missing = [(a, i) for a, i, digest in known if digest is None]
        stored = {(a, i): bytes(d) for a, i, d in known if d is not None}
        if missing:
            # Stored by a transaction that committed after this statement began (the same
            # batch on another process): visible to a new statement.
            stored.update(
                ((a, i), bytes(d))
                for a, i, d in conn.execute(
                    "SELECT e.account, e.event_id, e.digest FROM event_ids e"
                    " JOIN unnest(%s::bigint[], %s::text[]) AS v(account, event_id)"
                    " ON e.account = v.account AND e.event_id = v.event_id",
                    _columns(missing, 2),
                )
            )
        repeats.extend(index_of[(a, i)] for a, i, _ in known)
        conflicts.extend(index_of[k] for k in stored if stored[k] != first[k])
        return _per_batch(batches, repeats, sorted(conflicts))

    def _resolve(
        self, conn: Conn, events: Sequence[Event]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """The row ids of the batch's accounts and keys; NotFound names the first that does
        not exist."""
        account_ids = sorted({e.account_id for e in events})
        key_ids = sorted({e.key_id for e in events if e.key_id})
        accounts, keys = self._row_ids(conn, account_ids, key_ids)
        for noun, wanted, found in (("account", account_ids, accounts), ("key", key_ids, keys)):
            for ident in wanted:
                if ident not in found:
                    raise NotFound(f"{noun} {ident!r} does not exist")
        return accounts, keys

    def _row_ids(
        self, conn: Conn, account_ids: Sequence[str], key_ids: Sequence[str]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """The row ids of those of the named accounts and keys that exist. An id found is
        kept a moment (rows.ROW_IDS_KEPT_FOR: another process may delete its account); one
        not found is asked for again next time (another process may create it). The caches
        are replaced rather than emptied, so that a batch on another thread keeps the ones
        it started with."""
        if row_ids_stale(self._row_ids_since):
            self._forget_row_ids()
        account_rids, key_rids = self._account_rids, self._key_rids
        want_accounts = sorted(set(account_ids) - account_rids.keys())
        want_keys = sorted(set(key_ids) - key_rids.keys())
        if want_accounts or want_keys:
            for kind, ident, rid in conn.execute(
                "SELECT 'account', id, rid FROM accounts WHERE id = ANY(%s)"
                " UNION ALL SELECT 'key', id, rid FROM keys WHERE id = ANY(%s)",
                (want_accounts, want_keys),
            ):
                (account_rids if kind == "account" else key_rids)[ident] = rid
        return (
            {a: account_rids[a] for a in account_ids if a in account_rids},
            {k: key_rids[k] for k in key_ids if k in key_rids},
        )

    def _forget_row_ids(self) -> None:
        self._account_rids, self._key_rids = {}, {}
        self._row_ids_since = time.monotonic()

    # ---------------------------------------------------------------- queries

    def aggregate(self, spec: AggregateSpec) -> list[AggregateRow]:
        if not spec.windows:
            return []
        with self._connection() as conn:
            metric = self._metric_ids.get(spec.metric)
            if metric is None:
                row = conn.execute(
                    "SELECT id FROM metrics WHERE name = %s", (spec.metric,)
                ).fetchone()
                if row is None:
                    return []
                metric = self._metric_ids.setdefault(spec.metric, int(row[0]))
            key_ids = [spec.key_id] if spec.key_id is not None else []
            accounts, keys = self._row_ids(conn, spec.accounts, key_ids)
            if not accounts or len(keys) != len(key_ids):
                return []
            key = keys[spec.key_id] if spec.key_id is not None else None
            plans = plan_aggregate(
                spec, metric, sorted(accounts.values()), key, POSTGRES, pending="unfolded"
            )
            # Prepared, so each shape of question is planned once per connection (a generic
            # plan: the windows are arrays, the text the same whatever their number). Its
            # shape does not depend on the values: one index range scan per window, one key
            # probe per dimension set (sqlplan.py's joins say so). Planned each time with
            # the values bound in, the questions of bench.run's table took 1.17x this
            # (median; /v1/usage, five statements, 1.3x to 1.5x), answers equal.
            return run_plans(
                plans,
                lambda plan: conn.execute(plan.sql, plan.params, prepare=True),
                len(spec.measures),
            )

    def metrics_seen(
        self, accounts: Sequence[str], metric: str | None = None, *, dimensions: bool = True
    ) -> dict[str, list[str]]:
        with self._connection() as conn:
            rids = [
                int(r[0])
                for r in conn.execute(
                    "SELECT rid FROM accounts WHERE id = ANY(%s)", (list(accounts),)
                )
            ]
            if not rids:
                return {}
            if metric is None:
                names = conn.execute("SELECT id, name FROM metrics").fetchall()
            else:
                names = conn.execute(
                    "SELECT id, name FROM metrics WHERE name = %s", (metric,)
                ).fetchall()
            seen: dict[str, list[str]] = {}
            for metric_id, name in names:
                # Any day with usage: one index probe per account on the day rollups, and on
                # what waits to be folded; one statement, so one snapshot, where an event
                # is in one or the other.
                found_any = conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM rollup_day WHERE account = ANY(%s)"
                    " AND metric = %s) OR EXISTS (SELECT 1 FROM unfolded WHERE"
                    " account = ANY(%s) AND metric = %s)",
                    (rids, metric_id, rids, metric_id),
                ).fetchone()
                if not found_any or not found_any[0]:
                    continue
                if not dimensions:
                    seen[name] = []
                    continue
                found = conn.execute(
                    "SELECT DISTINCT jsonb_object_keys(dims) FROM dimsets WHERE id IN"
                    " (SELECT dimset FROM rollup WHERE account = ANY(%s) AND metric = %s"
                    " UNION SELECT dimset FROM unfolded WHERE account = ANY(%s)"
                    " AND metric = %s)",
                    (rids, metric_id, rids, metric_id),
                )
                seen[name] = sorted(str(r[0]) for r in found)
            return seen

    def create_portal_token(self, token: PortalToken, secret_hash: bytes) -> PortalToken:
        with self._connection() as conn, conn.transaction():
            self._rid(conn, "accounts", "account", token.account_id)  # NotFound says which
            try:
                conn.execute(portalrows.insert("%s"), portalrows.params(token, secret_hash))
            except errors.UniqueViolation as exc:
                raise Conflict(f"portal token id {token.id!r} is already taken") from exc
        return token

    def find_portal_tokens_by_lookup(self, lookup: bytes) -> list[tuple[PortalToken, bytes]]:
        rows = self._rows(portalrows.select_by_lookup("%s"), (lookup,))
        return [portalrows.token_from_row(row) for row in rows]

    def revoke_portal_token(self, token_id: str) -> PortalToken:
        with self._connection() as conn:
            row = conn.execute(portalrows.revoke("%s"), (_now_ms(), token_id)).fetchone()
        if row is None:
            raise NotFound(f"portal token {token_id!r} does not exist")
        return portalrows.token_from_row(row)[0]

    def count_events(self) -> int:
        return int(self._rows("SELECT count(*) FROM events")[0][0])

    def last_seq(self) -> int:
        return int(self._rows("SELECT coalesce(max(seq), 0) FROM events")[0][0])

    def touched(
        self, after_seq: int, upto_seq: int, metrics: Sequence[str]
    ) -> list[tuple[str, str, int, int]]:
        if not metrics:
            return []
        sql, params = plan_touched(after_seq, upto_seq, metrics, POSTGRES)
        return [(r[0], r[1], int(r[2]), int(r[3])) for r in self._rows(sql, params)]

    def database_size(self) -> int:
        """Bytes the database occupies (for GET /metrics)."""
        return int(self._rows("SELECT pg_database_size(current_database())")[0][0])

    def iter_events(
        self,
        accounts: Sequence[str] | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Iterator[Event]:
        sql, params = plan_export(accounts, start_ms, end_ms, POSTGRES)
        # A server-side cursor: a long export streams instead of loading every row.
        with (
            self._connection() as conn,
            conn.transaction(),
            conn.cursor(name="export") as cursor,
        ):
            cursor.execute(sql, params)
            for row in cursor:
                yield event_from_row(row)

    # ------------------------------------------------------------ corrections

    _dialect = POSTGRES

    def _begin_correction(self, run: Run, hold_ingest: bool) -> None:
        if hold_ingest:
            # A batch inserts into events (ROW EXCLUSIVE), which this mode excludes, as it
            # excludes another void: batches in flight commit first, new ones wait for the
            # void. Without it, a batch (or a void) that committed between this void's
            # clearing of a rollup cell and its refold could be counted twice: in the cell
            # it wrote, and in the refold that read its events.
            run("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE", ())
            # Then the rollups made whole: every waiting event folded (after any fold in
            # progress commits), and no fold until this commits, since the correction
            # clears and refolds rollup cells from the events themselves.
            run("SELECT pg_advisory_xact_lock(?)", (FOLD_LOCK,))
            run(FOLD_SQL, ())

    def _gone(self, run: Run, account: int, ids: Sequence[str]) -> set[str]:
        rows = run(
            "SELECT event_id FROM event_ids WHERE account = ? AND event_id = ANY(?)",
            (account, list(ids)),
        )
        return {row[0] for row in rows}

    def _claim_id(self, run: Run, account: int, event: Event) -> None:
        if not run(
            "INSERT INTO event_ids (account, event_id, digest) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING RETURNING 1",
            (account, event.id, _digest(event)),
        ):
            raise Conflict(f"event id {event.id!r} is already taken in this account")

    def _refold(self, run: Run, account: int, metric: int, start_ms: int, end_ms: int) -> None:
        for table in ROLLUPS:
            run(
                "WITH src AS (SELECT * FROM events WHERE account = ? AND metric = ?"
                " AND ts >= ? AND ts < ?) " + fold_into(table, "src", "seq"),
                (account, metric, start_ms, end_ms),
            )
        # The distinct values of those hours (whole days: voidsql clears days), cleared and
        # gathered again from the events: a set cannot take one event out.
        run(
            "DELETE FROM rollup_values WHERE account = ? AND metric = ? AND slot >= ? AND slot < ?",
            (account, metric, start_ms // HOUR_MS, end_ms // HOUR_MS),
        )
        run(
            "WITH src AS (SELECT * FROM events WHERE account = ? AND metric = ?"
            " AND ts >= ? AND ts < ?) " + fold_values("src", floor_div("ts", HOUR_MS)),
            (account, metric, start_ms, end_ms),
        )

    def _forget_accounts(self, account_ids: Sequence[str]) -> None:
        self._forget_row_ids()
        self._directory.changed()

    def _forget_accounts_in_transaction(self) -> None:
        self._directory.changed()

    def _account_tables(self) -> tuple[str, ...]:
        return ("event_ids", "rollup_values")

    def compact(self) -> None:
        """Drop the monthly partitions retention emptied, and VACUUM what remains."""
        horizon = self.raw_horizon()
        with self._connection() as conn:
            for name, _, end in events_partitions(conn):
                if horizon is not None and end <= horizon:
                    conn.execute(f"DROP TABLE {name}")
                    self._partitions = {p for p in self._partitions if p[0] != name}
            conn.execute("VACUUM (ANALYZE) events, event_ids")

    # ------------------------------------------------------ limits and alerts

    def _limit_read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._rows(sql.replace("?", "%s"), params)

    @contextmanager
    def _limit_write(self) -> Iterator[Run]:
        with self._connection() as conn, conn.transaction():

            def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
                cursor = conn.execute(sql.replace("?", "%s"), params)
                return cursor.fetchall() if cursor.description else []

            yield run

    def _create_limit_tables(self) -> None:
        with self._limit_write() as run:
            # Two processes starting together: one creates, the other waits, then finds them.
            run("SELECT pg_advisory_xact_lock(7317001)", ())
            for statement in (*LIMIT_SCHEMA, *VOID_SCHEMA):
                run(statement, ())
