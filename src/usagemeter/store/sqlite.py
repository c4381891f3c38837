"""The SQLite adapter: the embedded default store (its tables: schema.py; its queries:
sqlplan.py).

One writer connection serialises writes (``BEGIN IMMEDIATE``) and updates a batch's rollups in
the same transaction as its events, so an acknowledged event is visible to every query at once.
Readers use their own per-thread connections beside it (WAL). ``synchronous=FULL`` makes a
commit durable before ``append`` returns.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from usagemeter.model import (
    Account,
    ApiKey,
    AppendResult,
    Event,
    PortalToken,
    Scope,
)
from usagemeter.store import portalrows
from usagemeter.store.base import (
    AggregateRow,
    AggregateSpec,
    Conflict,
    NotFound,
    StoreUnavailable,
)
from usagemeter.store.schema import ROLLUP_TABLES, SCHEMA, SCHEMA_VERSION, Rollups
from usagemeter.store.sqlplan import plan_aggregate, run_plans
from usagemeter.timewindows import BillingCycle

LOOKUP_BYTES = 8  # digest prefix indexed for key lookup; auth compares the whole digest
log = logging.getLogger("usagemeter")
NO_KEY = 0  # rowid 0 is never assigned, so it stands for "the event named no key"
PAIR_CHUNK = 2000  # (account, id) pairs per dedupe lookup: 4,000 variables, under the limit


def _disk_full(error: BaseException | None) -> bool:
    """True if ``error`` or one it arose from is SQLite's SQLITE_FULL. The chain matters:
    when the disk fills mid-batch, SQLite may roll the whole transaction back, and the
    savepoint rollback that follows fails with an error of its own."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, sqlite3.Error) and (
            getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "database or disk is full" in str(error)
        ):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def _from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


class _PendingBatch:
    """One caller's batch, waiting for the group commit that carries it."""

    __slots__ = ("done", "error", "events", "result")

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = events
        self.done = False
        self.result: AppendResult | None = None
        self.error: BaseException | None = None


class SQLiteStore:
    """The embedded store on one SQLite file. Safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_PendingBatch] = []
        self._writer = self._connect()
        self._migrate()
        # Interned ids, cached for the write path. Only filled after a commit, so a rolled
        # back batch never leaves a cached id that the file does not hold.
        self._metric_ids: dict[str, int] = {}
        self._dimset_ids: dict[tuple[tuple[str, str], ...], int] = {}
        self._tagset_ids: dict[frozenset[str], int] = {}
        self._account_rids: dict[str, int] = {}
        self._key_rids: dict[str, int] = {}

    def _migrate(self) -> None:
        """Create the schema, or bring an older file's rollups up to this version's."""
        conn = self._writer
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        existed = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
        ).fetchone()
        conn.executescript(SCHEMA)
        if existed and version != SCHEMA_VERSION:
            # Rollup tables came and changed shape between versions; the raw events are
            # the truth, so the rollups are folded again from them.
            log.warning(
                "rebuilding rollups of %s (schema %s -> %s)", self.path, version, SCHEMA_VERSION
            )
            self.rebuild_rollups()
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def rebuild_rollups(self) -> None:
        """Fold every stored event into empty rollups again, in one transaction."""
        conn = self._writer
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for table in ROLLUP_TABLES:
                    conn.execute(f"DELETE FROM {table}")
                cursor = conn.execute(
                    "SELECT metric, account, key, billable, dimset, tagset, ts, value"
                    " FROM events ORDER BY seq"
                )
                while chunk := cursor.fetchmany(50_000):
                    rollups = Rollups()
                    for row in chunk:
                        rollups.add(*row)
                    rollups.write(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it returns, so an acknowledged batch survives a
        # power cut, not only a crash of this process.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA cache_size=-65536")
        # Checkpoint every 64 MB of WAL rather than 4 MB: a large batch dirties hundreds of
        # pages, and checkpointing after nearly every commit doubled its disk writes.
        conn.execute("PRAGMA wal_autocheckpoint=16384")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def close(self) -> None:
        self._checkpoint()  # a clean close leaves no WAL behind to replay or to hold space
        with self._write_lock:
            self._writer.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---------------------------------------------------------------- accounts

    def _account_rid(self, conn: sqlite3.Connection, account_id: str) -> int:
        rid = self._account_rids.get(account_id)
        if rid is None:
            row = conn.execute("SELECT rid FROM accounts WHERE id = ?", (account_id,)).fetchone()
            if row is None:
                raise NotFound(f"account {account_id!r} does not exist")
            rid = int(row[0])
            self._account_rids[account_id] = rid
        return rid

    def create_account(self, account: Account) -> Account:
        created = account.created_at or datetime.now(UTC)
        cycle = account.billing_cycle
        with self._write_lock:
            parent = None
            if account.parent_id is not None:
                parent = self._account_rid(self._writer, account.parent_id)
            try:
                self._writer.execute(
                    "INSERT INTO accounts (id, name, parent, cycle_anchor, cycle_period,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        account.id,
                        account.name,
                        parent,
                        cycle.anchor.isoformat() if cycle else None,
                        cycle.period if cycle else None,
                        int(created.timestamp() * 1000),
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"account id {account.id!r} is already taken") from exc
        return self.get_account(account.id)

    _ACCOUNT_COLUMNS = (
        "a.id, a.name, p.id, a.cycle_anchor, a.cycle_period, a.created_at"
        " FROM accounts a LEFT JOIN accounts p ON p.rid = a.parent"
    )

    @staticmethod
    def _account_from_row(row: tuple[Any, ...]) -> Account:
        cycle = None
        if row[3] is not None:
            cycle = BillingCycle(date.fromisoformat(row[3]), row[4])
        return Account(row[0], row[1], row[2], cycle, _from_ms(row[5]))

    def get_account(self, account_id: str) -> Account:
        row = (
            self._reader()
            .execute(f"SELECT {self._ACCOUNT_COLUMNS} WHERE a.id = ?", (account_id,))
            .fetchone()
        )
        if row is None:
            raise NotFound(f"account {account_id!r} does not exist")
        return self._account_from_row(row)

    def list_accounts(self) -> list[Account]:
        rows = self._reader().execute(f"SELECT {self._ACCOUNT_COLUMNS} ORDER BY a.rid")
        return [self._account_from_row(row) for row in rows]

    def descendants(self, account_id: str) -> list[str]:
        rows = (
            self._reader()
            .execute(
                """WITH RECURSIVE tree(rid, id, depth) AS (
                   SELECT rid, id, 0 FROM accounts WHERE id = ?
                   UNION ALL
                   SELECT a.rid, a.id, tree.depth + 1
                   FROM accounts a JOIN tree ON a.parent = tree.rid
               ) SELECT id FROM tree ORDER BY depth, rid""",
                (account_id,),
            )
            .fetchall()
        )
        if not rows:
            raise NotFound(f"account {account_id!r} does not exist")
        return [row[0] for row in rows]

    def ancestors(self, account_id: str) -> list[str]:
        rows = (
            self._reader()
            .execute(
                """WITH RECURSIVE up(rid, id, parent, depth) AS (
                   SELECT rid, id, parent, 0 FROM accounts WHERE id = ?
                   UNION ALL
                   SELECT a.rid, a.id, a.parent, up.depth + 1
                   FROM accounts a JOIN up ON a.rid = up.parent
               ) SELECT id FROM up ORDER BY depth""",
                (account_id,),
            )
            .fetchall()
        )
        if not rows:
            raise NotFound(f"account {account_id!r} does not exist")
        return [row[0] for row in rows]

    # -------------------------------------------------------------------- keys

    _KEY_COLUMNS = (
        "k.id, a.id, k.name, k.prefix, k.scopes, k.created_at, k.revoked_at, k.secret_hash"
        " FROM keys k LEFT JOIN accounts a ON a.rid = k.account"
    )

    @staticmethod
    def _key_from_row(row: tuple[Any, ...]) -> ApiKey:
        scopes = frozenset(Scope(s) for s in row[4].split(",") if s)
        created = _from_ms(row[5])
        assert created is not None
        return ApiKey(row[0], row[1], row[2], row[3], scopes, created, _from_ms(row[6]))

    def create_key(self, key: ApiKey, secret_hash: bytes) -> ApiKey:
        with self._write_lock:
            account = None
            if key.account_id is not None:
                account = self._account_rid(self._writer, key.account_id)
            try:
                self._writer.execute(
                    "INSERT INTO keys (id, account, name, prefix, scopes, secret_hash, lookup,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key.id,
                        account,
                        key.name,
                        key.prefix,
                        ",".join(sorted(s.value for s in key.scopes)),
                        secret_hash,
                        secret_hash[:LOOKUP_BYTES],
                        int(key.created_at.timestamp() * 1000),
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"key id {key.id!r} is already taken") from exc
        return self.get_key(key.id)

    def get_key(self, key_id: str) -> ApiKey:
        row = self._reader().execute(f"SELECT {self._KEY_COLUMNS} WHERE k.id = ?", (key_id,))
        found = row.fetchone()
        if found is None:
            raise NotFound(f"key {key_id!r} does not exist")
        return self._key_from_row(found)

    def find_keys_by_lookup(self, lookup: bytes) -> list[tuple[ApiKey, bytes]]:
        rows = self._reader().execute(f"SELECT {self._KEY_COLUMNS} WHERE k.lookup = ?", (lookup,))
        return [(self._key_from_row(row), bytes(row[7])) for row in rows]

    def list_keys(self, account_id: str | None) -> list[ApiKey]:
        if account_id is None:
            rows = self._reader().execute(
                f"SELECT {self._KEY_COLUMNS} WHERE k.account IS NULL ORDER BY k.rid"
            )
        else:
            rows = self._reader().execute(
                f"SELECT {self._KEY_COLUMNS} WHERE a.id = ? ORDER BY k.rid", (account_id,)
            )
        return [self._key_from_row(row) for row in rows]

    def revoke_key(self, key_id: str) -> ApiKey:
        with self._write_lock:
            cur = self._writer.execute(
                "UPDATE keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (_now_ms(), key_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"key {key_id!r} does not exist")
        return self.get_key(key_id)

    def create_portal_token(self, token: PortalToken, secret_hash: bytes) -> PortalToken:
        with self._write_lock:
            self._account_rid(self._writer, token.account_id)  # NotFound says which
            try:
                self._writer.execute(portalrows.insert("?"), portalrows.params(token, secret_hash))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"portal token id {token.id!r} is already taken") from exc
        return token

    def find_portal_tokens_by_lookup(self, lookup: bytes) -> list[tuple[PortalToken, bytes]]:
        rows = self._reader().execute(portalrows.select_by_lookup("?"), (lookup,)).fetchall()
        return [portalrows.token_from_row(row) for row in rows]

    def revoke_portal_token(self, token_id: str) -> PortalToken:
        with self._write_lock:
            row = self._writer.execute(portalrows.revoke("?"), (_now_ms(), token_id)).fetchone()
        if row is None:
            raise NotFound(f"portal token {token_id!r} does not exist")
        return portalrows.token_from_row(row)[0]

    def _key_rid(self, conn: sqlite3.Connection, key_id: str) -> int:
        rid = self._key_rids.get(key_id)
        if rid is None:
            row = conn.execute("SELECT rid FROM keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"key {key_id!r} does not exist")
            rid = int(row[0])
            self._key_rids[key_id] = rid
        return rid

    # ------------------------------------------------------------------ events

    def _intern(self, table: str, column: str, value: str, pending: dict[str, int]) -> int:
        found = pending.get(value)
        if found is not None:
            return found
        conn = self._writer
        row = conn.execute(f"SELECT id FROM {table} WHERE {column} = ?", (value,)).fetchone()
        if row is None:
            cur = conn.execute(f"INSERT INTO {table} ({column}) VALUES (?)", (value,))
            assert cur.lastrowid is not None
            new_id = int(cur.lastrowid)
            if table == "tagsets":
                conn.executemany(
                    "INSERT INTO tagset_tags (tag, tagset) VALUES (?, ?)",
                    [(tag, new_id) for tag in json.loads(value)],
                )
        else:
            new_id = int(row[0])
        pending[value] = new_id
        return new_id

    def append(self, events: Sequence[Event]) -> AppendResult:
        if not events:
            return AppendResult(0, 0)
        # Group commit: batches that arrive while a commit is under way wait for the lock
        # together, and whoever takes it next writes all of them in one transaction, so one
        # fsync acknowledges them all. Each batch keeps its own savepoint: a failing batch
        # rolls back alone, and each caller gets its own result or error.
        mine = _PendingBatch(events)
        with self._queue_lock:
            self._queue.append(mine)
        with self._write_lock:
            if not mine.done:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit_group(group)
        if mine.error is not None:
            raise self._translate(mine.error)
        assert mine.result is not None
        return mine.result

    def _translate(self, error: BaseException) -> BaseException:
        """A full disk as the store-agnostic StoreUnavailable (after a checkpoint, so that
        space freed from now on goes to new batches, not to a growing WAL); any other error
        as it is."""
        if not _disk_full(error):
            return error
        log.error("writes to %s fail: %s", self.path, error)
        with self._write_lock:
            # Checkpoint every 4 MB of WAL from now on rather than every 64: with little
            # space freed, a WAL left to grow would take all of it again.
            self._writer.execute("PRAGMA wal_autocheckpoint=1000")
        self._checkpoint()
        unavailable = StoreUnavailable(
            "the store's disk is full: nothing of this batch was stored; send it again"
            " once space is freed"
        )
        unavailable.__cause__ = error
        return unavailable

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate the WAL, giving its space back."""
        with self._write_lock:
            try:
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("checkpoint of %s failed: %s", self.path, exc)

    def _commit_group(self, group: list[_PendingBatch]) -> None:
        conn = self._writer
        interned: list[tuple[dict[str, int], dict[str, int], dict[str, int]]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for batch in group:
                conn.execute("SAVEPOINT batch")
                try:
                    batch.result, names = self._append_locked(conn, batch.events)
                except Exception as exc:
                    conn.execute("ROLLBACK TO batch")
                    batch.error = exc
                else:
                    interned.append(names)
                conn.execute("RELEASE batch")
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for batch in group:
                batch.result, batch.error = None, batch.error or exc
                batch.done = True
            if not isinstance(exc, Exception):
                raise
            return
        for batch in group:
            batch.done = True
        for metrics, dimsets, tagsets in interned:
            self._metric_ids.update(metrics)
            self._dimset_ids.update(
                {tuple(sorted(json.loads(k).items())): v for k, v in dimsets.items()}
            )
            self._tagset_ids.update({frozenset(json.loads(k)): v for k, v in tagsets.items()})

    def _append_locked(
        self, conn: sqlite3.Connection, events: Sequence[Event]
    ) -> tuple[AppendResult, tuple[dict[str, int], dict[str, int], dict[str, int]]]:
        new_metrics: dict[str, int] = {}
        new_dimsets: dict[str, int] = {}
        new_tagsets: dict[str, int] = {}

        # Which (account, id) pairs this file has already seen, asked in a few statements
        # whatever the number of accounts: a batch often spans hundreds of them.
        pairs = list(dict.fromkeys((self._account_rid(conn, e.account_id), e.id) for e in events))
        seen: set[tuple[str, str]] = set()
        names = {self._account_rid(conn, e.account_id): e.account_id for e in events}
        for i in range(0, len(pairs), PAIR_CHUNK):
            chunk = pairs[i : i + PAIR_CHUNK]
            values = ",".join(["(?,?)"] * len(chunk))
            for rid, event_id in conn.execute(
                # A join, not "(account, event_id) IN (VALUES ...)": SQLite plans that
                # as a scan of the whole index, and this as one index search per pair.
                f"WITH v(a, i) AS (VALUES {values}) SELECT e.account, e.event_id"
                " FROM v JOIN events e ON e.account = v.a AND e.event_id = v.i",
                [v for pair in chunk for v in pair],
            ):
                seen.add((names[rid], event_id))

        rows: list[tuple[Any, ...]] = []
        rollups = Rollups()
        duplicates = 0
        for event in events:
            ident = (event.account_id, event.id)
            if ident in seen:
                duplicates += 1
                continue
            seen.add(ident)
            account = self._account_rid(conn, event.account_id)
            metric = self._metric_ids.get(event.metric) or self._intern(
                "metrics", "name", event.metric, new_metrics
            )
            key = NO_KEY if event.key_id is None else self._key_rid(conn, event.key_id)
            dims_key = tuple(sorted(event.dimensions.items())) if event.dimensions else ()
            dimset = self._dimset_ids.get(dims_key)
            if dimset is None:
                dims_text = json.dumps(dict(dims_key), separators=(",", ":"))
                dimset = self._intern("dimsets", "dims", dims_text, new_dimsets)
            tagset = self._tagset_ids.get(event.tags)
            if tagset is None:
                tags_text = json.dumps(sorted(event.tags), separators=(",", ":"))
                tagset = self._intern("tagsets", "tags", tags_text, new_tagsets)
            billable = 1 if event.billable else 0
            value = event.value
            rows.append(
                (account, event.id, metric, event.ts_ms, key, billable, dimset, tagset, value)
            )
            rollups.add(metric, account, key, billable, dimset, tagset, event.ts_ms, value)

        conn.executemany(
            "INSERT INTO events (account, event_id, metric, ts, key, billable, dimset, tagset,"
            " value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        rollups.write(conn)
        return AppendResult(len(rows), duplicates), (new_metrics, new_dimsets, new_tagsets)

    # ---------------------------------------------------------------- queries

    def _ids(self, conn: sqlite3.Connection, table: str, column: str, value: str) -> int | None:
        row = conn.execute(f"SELECT id FROM {table} WHERE {column} = ?", (value,)).fetchone()
        return None if row is None else int(row[0])

    def aggregate(self, spec: AggregateSpec) -> list[AggregateRow]:
        conn = self._reader()
        metric = self._ids(conn, "metrics", "name", spec.metric)
        if metric is None or not spec.windows:
            return []
        account_rids = []
        for account_id in spec.accounts:
            row = conn.execute("SELECT rid FROM accounts WHERE id = ?", (account_id,)).fetchone()
            if row is not None:
                account_rids.append(int(row[0]))
        key_rid: int | None = None
        if spec.key_id is not None:
            row = conn.execute("SELECT rid FROM keys WHERE id = ?", (spec.key_id,)).fetchone()
            if row is None:
                return []
            key_rid = int(row[0])
        if not account_rids:
            return []
        plans = plan_aggregate(spec, metric, account_rids, key_rid)
        return run_plans(plans, lambda p: conn.execute(p.sql, p.params), len(spec.measures))

    def metrics_seen(
        self, accounts: Sequence[str], metric: str | None = None, *, dimensions: bool = True
    ) -> dict[str, list[str]]:
        conn = self._reader()
        rids = [
            int(row[0])
            for account_id in accounts
            for row in conn.execute("SELECT rid FROM accounts WHERE id = ?", (account_id,))
        ]
        if not rids:
            return {}
        where_accounts = f"account IN ({','.join('?' * len(rids))})"
        if metric is None:
            names = conn.execute("SELECT id, name FROM metrics").fetchall()
        else:
            names = conn.execute(
                "SELECT id, name FROM metrics WHERE name = ?", (metric,)
            ).fetchall()
        seen: dict[str, list[str]] = {}
        for metric_id, name in names:
            # One index seek per metric on the day rollups: is there any day with usage?
            if not conn.execute(
                f"SELECT 1 FROM rollup_day WHERE metric = ? AND {where_accounts} LIMIT 1",
                (metric_id, *rids),
            ).fetchone():
                continue
            if not dimensions:
                seen[name] = []
                continue
            # The dimension sets in use are interned: read their ids off the slot rollups
            # of this metric and accounts (one range of the primary key), then their names.
            dimension_names: set[str] = set()
            for (dims,) in conn.execute(
                "SELECT dims FROM dimsets WHERE id IN (SELECT DISTINCT dimset FROM rollup"
                f" WHERE metric = ? AND {where_accounts})",
                (metric_id, *rids),
            ):
                dimension_names.update(json.loads(dims))
            seen[name] = sorted(dimension_names)
        return seen

    def key_secret_hash(self, key_id: str) -> bytes:
        row = self._reader().execute("SELECT secret_hash FROM keys WHERE id = ?", (key_id,))
        found = row.fetchone()
        if found is None:
            raise NotFound(f"key {key_id!r} does not exist")
        return bytes(found[0])

    def backup(self, dest: str | Path) -> None:
        """Write a consistent copy of the whole file to ``dest`` (which must not exist) while
        writers go on. VACUUM INTO reads one snapshot, so the copy holds every batch committed
        before it began and nothing of one committed after: no batch is ever half in it."""
        conn = self._connect()  # a connection of its own: the copy is one long read
        try:
            conn.execute("VACUUM INTO ?", (str(dest),))
        finally:
            conn.close()

    def count_events(self) -> int:
        return int(self._reader().execute("SELECT count(*) FROM events").fetchone()[0])

    def iter_events(
        self,
        accounts: Sequence[str] | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Iterator[Event]:
        where = ["1"]
        params: list[Any] = []
        if accounts is not None:
            where.append(f"a.id IN ({','.join('?' * len(accounts))})")
            params.extend(accounts)
        if start_ms is not None:
            where.append("e.ts >= ?")
            params.append(start_ms)
        if end_ms is not None:
            where.append("e.ts < ?")
            params.append(end_ms)
        sql = (
            "SELECT e.event_id, a.id, m.name, e.ts, e.value, e.billable, k.id, d.dims, t.tags"
            " FROM events e JOIN accounts a ON a.rid = e.account JOIN metrics m ON m.id = e.metric"
            " LEFT JOIN keys k ON k.rid = e.key JOIN dimsets d ON d.id = e.dimset"
            f" JOIN tagsets t ON t.id = e.tagset WHERE {' AND '.join(where)} ORDER BY e.seq"
        )
        # A connection of its own, so a long export does not hold a pooled reader.
        conn = self._connect()
        try:
            for row in conn.execute(sql, params):
                yield Event(
                    id=row[0],
                    account_id=row[1],
                    metric=row[2],
                    ts_ms=row[3],
                    value=row[4],
                    billable=bool(row[5]),
                    key_id=row[6],
                    dimensions=json.loads(row[7]),
                    tags=frozenset(json.loads(row[8])),
                )
        finally:
            conn.close()
