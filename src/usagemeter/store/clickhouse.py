"""The ClickHouse adapter: the scale-out store (its tables: chschema.py; its queries:
chplan.py; its connection: chtransport.py, in process through chDB or over HTTP).

The promises are the other stores', kept this way:

- Rollups are kept by the engine: materialized views fold each insert into them as part of
  the INSERT, so when ``append`` returns the events and their rollups are stored (and fsynced:
  see chschema._DURABLE) and the next question sees them (read-your-writes). A database
  created with ``?fold=later`` has no such views: its rollups are folded after the
  acknowledgement, and every question first folds what waits (chfold.py).
- A batch is written by one INSERT of one block, alone or with the batches that queued
  behind the INSERT before it (group commit, chappend.py). Accounts and keys are checked
  before a batch joins a group, so a batch naming an unknown one stores nothing and fails
  alone; an INSERT that fails fails every batch of its group, each whole. (ClickHouse has no
  transactions: a server that dies in the middle of an INSERT spanning partitions (years;
  months in an older database) may keep some of their parts; a retry of the batch is then
  deduplicated per event and completes it.)
- Dedupe per (account, id), forever: before inserting, the store looks the group's ids up in
  ``event_ids`` (kept by the engine from every insert, ordered by the id) while
  holding a process lock, so within one process an id is stored once whatever the threads,
  and a retry after the first attempt was acknowledged is caught by any process. The insert
  carries a dedupe token naming its new events, so one batch racing at two processes, each
  written alone, is stored once. The window that remains: batches sharing ids, looked up at
  two processes before either inserted (a few milliseconds), unless both INSERTs named the
  same new events (a batch written alone at both). Route each account's ingest to one
  process (docs/clickhouse.md) to close it.
  In chDB mode (one process per directory) only the ids an index of this process's stored
  ids cannot rule out are looked up (chidindex.py).
- Distinct counts and latest values are exact over any range: distinct counts merge exact
  states (of an hour's values, or of the slots' and raw events' values), never counts,
  and latest values are the maximum of (ts, seq, value) or travel as argMax states.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from usagemeter.corrections import Amendment, VoidSelector
from usagemeter.model import Account, ApiKey, AppendResult, Event, PortalToken
from usagemeter.store.base import (
    AggregateColumns,
    AggregateRow,
    AggregateSpec,
    Conflict,
    NotFound,
    Window,
)
from usagemeter.store.chappend import (
    GROUP_EVENTS,
    Group,
    IdHasher,
    Prepared,
    group_columns,
    sort_out,
    token,
)
from usagemeter.store.chfold import Folder
from usagemeter.store.chplan import (
    RaggedPlan,
    SetsPlan,
    decode_columns,
    decode_sets,
    plan_aggregate,
)
from usagemeter.store.chschema import (
    DISTINCT,
    DISTINCT_GRAIN,
    DISTINCT_VALUES,
    FOLD_DONE_TABLE,
    FOLD_EVENTS,
    FOLD_FEED_TABLE,
    FOLD_UNITS,
    FOLD_UNITS_TABLE,
    FOLD_UNITS_VIEW,
    GRAINS,
    HOUR_SETS,
    HOUR_VALUES,
    LEGACY_GRAINS,
    LEGACY_LATEST,
    ROLLUP_VIEWS,
    fold_feed_views,
    latest_keyed,
    pack_small_parts,
    statements,
)
from usagemeter.store.chsettle import VALUES_HISTORY_MS, VALUES_PARTS_S, settle_rollups
from usagemeter.store.chtransport import ChdbTransport, Transport, insert_rows, literal, literals
from usagemeter.store.chupgrade import Backfilled, regroup_sets_views
from usagemeter.store.chvoids import ChCorrections
from usagemeter.store.limitstore import LimitTables, Run
from usagemeter.store.pgcommit import GroupCommit
from usagemeter.store.rows import LOOKUP_BYTES, account_from_row, key_from_row, row_ids_stale
from usagemeter.store.sidefile import SideFile
from usagemeter.store.sqlplan import Grain, Plan, run_plans
from usagemeter.timewindows import SLOT_MS

if TYPE_CHECKING:
    from usagemeter.store.chidindex import IdIndex

EXPORT_PAGE = 10_000  # events per query while exporting
_ACCOUNT_COLUMNS = "id, name, parent, cycle_anchor, cycle_period, created_at"
_KEY_COLUMNS = "id, account, name, prefix, scopes, created_at, revoked_at, secret_hash"


# At most this many sets' dimensions looked up for one answer (more: it is answered by the
# values), and kept between answers (then forgotten at once, and looked up again).
SETS_LOOKED_UP = 1_000
SETS_KEPT = 100_000
# Questions whose statements are kept (plans), each with the windows it was planned for:
# usually the engine's kept ones, but an entry may outlive them (a 90-day hourly report's
# windows take about 0.3 MB).
PLANS_KEPT = 32


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


class ClickHouseStore(ChCorrections, LimitTables):
    """The store on one ClickHouse database. Safe to share between threads. Limits, alerts
    and portal tokens live in a SQLite file beside it (``side_path``, see sidefile.py)."""

    def __init__(self, transport: Transport, side_path: str, fold_later: bool = False) -> None:
        self.transport = transport
        self.side = SideFile(side_path)
        fresh = not self._has_table(transport, "events")
        # The rollups folded after the acknowledgement (chfold.py): chosen when the database
        # is created (its fold log first), then the database's, whatever a later URL says.
        if fresh and fold_later:
            transport.command(FOLD_UNITS_TABLE)
        self.fold_later = self._has_table(transport, FOLD_UNITS)
        # A new database keys the latest value of its tables of sets by one number; one made
        # before round 15 keeps the tuple, and the tables it gets later follow it. Read back
        # once created: another process may have created them first.
        found = latest_keyed(transport)
        for statement in statements(found is None or found):
            if not (self.fold_later and statement in ROLLUP_VIEWS):
                transport.command(statement)
        if self.fold_later:
            for statement in (*FOLD_EVENTS, FOLD_DONE_TABLE, FOLD_UNITS_VIEW, FOLD_FEED_TABLE):
                transport.command(statement)
            for statement in fold_feed_views(latest_keyed(transport) is not False):
                transport.command(statement)
            if self._has_table(transport, "rollup_mv"):
                raise RuntimeError(
                    "this database has both the rollups' views and a fold log: two processes"
                    " created it at once with different fold options; drop it and start one"
                )
        self.keyed_latest = latest_keyed(transport) is not False
        pack_small_parts(transport)
        settle_rollups(transport)  # merged once quiet: the questions read a row per hour
        # Held across the dedupe lookup and the insert, and across the uniqueness check and
        # the insert of an account or key: ClickHouse enforces no unique keys itself.
        self._lock = threading.Lock()
        # Held by voids and account deletions, and by the hour table's backfill (appends go
        # on beside it): see chupgrade.py.
        self._corrections = threading.Lock()
        views = not self.fold_later
        self.hour_sets = Backfilled(
            transport, self._corrections, fresh, HOUR_SETS, self.keyed_latest, views
        )
        self.hour_values = Backfilled(transport, self._corrections, fresh, HOUR_VALUES, view=views)
        self.distinct_values = Backfilled(
            transport, self._corrections, fresh, DISTINCT_VALUES, view=views
        )
        # One account's distinct values counted as rows (FINAL), else each value once.
        self.count_value_rows = True
        # When this process last wrote history's distinct values (time.monotonic(): an
        # append of events a day old or more, or the backfill's end, noted when a question
        # first finds the table complete): until chsettle.VALUES_PARTS_S later, Sessions
        # takes the table to be in several large parts.
        self.values_written = float("-inf")
        self._values_complete = self.distinct_values.ready()
        # The distinct states per hour of a database made before round 14: still fed (older
        # processes read them) and read until the distinct values are complete; a new
        # database has none (chschema.DISTINCT).
        self.distinct_hours: Backfilled | None = None
        if self._has_table(transport, DISTINCT):
            self.distinct_hours = Backfilled(transport, self._corrections, False, DISTINCT)
        self.latest_hours = self.hour_values  # the latest values' hours are read there
        # A database before round 12:
        regroup_sets_views(transport, self.hour_sets.boundary, self.keyed_latest)
        # An older database's tables that this version no longer feeds itself (their views
        # do, for older processes): refolded by voids, and the latest table's backfill, when
        # an older process began it, carried on (chschema.LEGACY_GRAINS).
        self.legacy = self._legacy_grains(transport)
        self.legacy_latest: Backfilled | None = None
        if any(g.table == LEGACY_LATEST for g in self.legacy):
            self.legacy_latest = Backfilled(transport, self._corrections, False, LEGACY_LATEST)
        self._last_seq = 0
        self._group_commit: GroupCommit[Prepared, AppendResult] = GroupCommit(
            self._write_group, GROUP_EVENTS
        )
        self._known: dict[str, set[str]] = {}
        # Each dimension set's dimensions and each tag set's tags by its id, as grouped and
        # tagged reports have looked them up (chplan.SetsPlan), and the questions whose sets
        # could not answer (_by_sets).
        self._sets: dict[int, dict[str, str]] = {}
        self._tagsets: dict[int, frozenset[str]] = {}
        self._by_value: set[tuple[tuple[str, ...], str, tuple[str, ...], frozenset[str]]] = set()
        # Each question's statements by what it asks but its windows, with the windows they
        # were planned for, and which tables were complete (plans).
        self._plans: dict[
            tuple[AggregateSpec, tuple[bool, ...]], tuple[tuple[Window, ...], tuple[Plan, ...]]
        ] = {}
        self._known_since = 0.0
        self._forget_known()
        self._create_void_tables()
        # Appends in flight in this process: the fold thread waits while there are any.
        self._appending = 0
        self._appending_lock = threading.Lock()
        self.folder: Folder | None = None
        if self.fold_later:
            self.folder = Folder(transport, lambda: self._appending > 0)
        # The ids this process has stored, in chDB mode: a group asks ClickHouse only about
        # those it may have stored (chidindex.py). Imported here: it needs numpy, which chDB
        # brings (through pandas) and an install for a server alone may lack.
        self.id_index: IdIndex | None = None
        self._hash_ids: IdHasher | None = None  # the index's, for each batch (chappend.py)
        if isinstance(transport, ChdbTransport):
            from usagemeter.store.chidindex import id_hashes, index_for

            self.id_index = index_for(transport, fresh)
            self._hash_ids = id_hashes

    @staticmethod
    def _legacy_grains(transport: Transport) -> tuple[Grain, ...]:
        names = literals([g.table for g in LEGACY_GRAINS])
        found = {
            row[0]
            for row in transport.query(
                "SELECT name FROM system.tables"
                f" WHERE database = currentDatabase() AND name IN ({names})"
            )
        }
        return tuple(g for g in LEGACY_GRAINS if g.table in found)

    @staticmethod
    def _has_table(transport: Transport, name: str) -> bool:
        return bool(
            transport.query(
                "SELECT 1 FROM system.tables"
                f" WHERE database = currentDatabase() AND name = {literal(name)}"
            )
        )

    def grains(self) -> tuple[Grain, ...]:
        """Every rollup this database has: what a void refolds and a deletion empties. The
        older tables are looked up again each time: once no process of an older version runs,
        an operator drops them (docs/clickhouse.md, "Ingest, round 9") while this one runs."""
        self.legacy = self._legacy_grains(self.transport)
        older_distinct = (DISTINCT_GRAIN,) if self.distinct_hours is not None else ()
        return (*GRAINS, *older_distinct, *self.legacy)

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()
        self.hour_sets.close()
        if self.distinct_hours is not None:
            self.distinct_hours.close()
        self.hour_values.close()
        self.distinct_values.close()
        if self.legacy_latest is not None:
            self.legacy_latest.close()
        if self.id_index is not None:
            self.id_index.detach()
        self.transport.close()
        self.side.close()

    def _limit_read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.side._limit_read(sql, params)

    def _limit_write(self) -> AbstractContextManager[Run]:
        return self.side._limit_write()

    def create_portal_token(self, token: PortalToken, secret_hash: bytes) -> PortalToken:
        self.get_account(token.account_id)  # NotFound says which
        return self.side.create_portal_token(token, secret_hash)

    def find_portal_tokens_by_lookup(self, lookup: bytes) -> list[tuple[PortalToken, bytes]]:
        return self.side.find_portal_tokens_by_lookup(lookup)

    def revoke_portal_token(self, token_id: str) -> PortalToken:
        return self.side.revoke_portal_token(token_id, time.time_ns() // 1_000_000)

    def _seqs(self, count: int) -> int:
        """The first of ``count`` increasing sequence numbers: nanoseconds of the clock, so
        that several processes' numbers interleave in time order."""
        first = max(self._last_seq + 1, time.time_ns())
        self._last_seq = first + count - 1
        return first

    def _ids(self, table: str, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        rows = self.transport.query(f"SELECT id FROM {table} FINAL WHERE id IN ({literals(ids)})")
        return {row[0] for row in rows}

    def _require(self, table: str, noun: str, ids: Sequence[str], *, recheck: bool = True) -> None:
        # Accounts and keys found to exist are not looked up again for a while: a batch then
        # costs no lookups of its accounts and keys. Only deleting an account takes one away
        # (a revoked key's events still count): this process forgets at once, another within
        # rows.ROW_IDS_KEPT_FOR. An append leaves that to its group's writer (recheck=False,
        # see _names_gone).
        if recheck and row_ids_stale(self._known_since):
            self._forget_known()
        known = self._known[table]
        wanted = sorted(set(ids) - known)
        found = self._ids(table, wanted)
        for ident in wanted:
            if ident not in found:
                raise NotFound(f"{noun} {ident!r} does not exist")
        known.update(found)

    def _forget_known(self) -> None:
        self._known = {"accounts": set(), "keys": set()}
        self._known_since = time.monotonic()

    def delete_account(self, account_id: str) -> dict[str, int]:
        counts = super().delete_account(account_id)
        self._forget_known()
        return counts

    # ---------------------------------------------------------------- accounts

    def create_account(self, account: Account) -> Account:
        created = account.created_at or datetime.now(UTC)
        cycle = account.billing_cycle
        with self._lock:
            if account.parent_id is not None:
                self._require("accounts", "account", [account.parent_id])
            if self._ids("accounts", [account.id]):
                raise Conflict(f"account id {account.id!r} is already taken")
            insert_rows(
                self.transport,
                "accounts",
                ("id", "name", "parent", "cycle_anchor", "cycle_period", "created_at", "seq"),
                [
                    (
                        account.id,
                        account.name,
                        account.parent_id,
                        cycle.anchor.isoformat() if cycle else None,
                        cycle.period if cycle else None,
                        int(created.timestamp() * 1000),
                        self._seqs(1),
                    )
                ],
            )
        return self.get_account(account.id)

    def get_account(self, account_id: str) -> Account:
        rows = self.transport.query(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts FINAL WHERE id = {literal(account_id)}"
        )
        if not rows:
            raise NotFound(f"account {account_id!r} does not exist")
        return account_from_row(tuple(rows[0]))

    def list_accounts(self) -> list[Account]:
        rows = self.transport.query(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts FINAL ORDER BY seq")
        return [account_from_row(tuple(row)) for row in rows]

    def _parents(self) -> list[tuple[str, str | None]]:
        """Every account with its parent, in creation order: the tree is small."""
        rows = self.transport.query("SELECT id, parent FROM accounts FINAL ORDER BY seq")
        return [(row[0], row[1]) for row in rows]

    def descendants(self, account_id: str) -> list[str]:
        accounts = self._parents()
        if account_id not in {a for a, _ in accounts}:
            raise NotFound(f"account {account_id!r} does not exist")
        # Level by level, each level in creation order: the SQL stores' order.
        found, level = [account_id], [account_id]
        while level:
            members = set(level)
            level = [a for a, parent in accounts if parent in members]
            found.extend(level)
        return found

    def ancestors(self, account_id: str) -> list[str]:
        parent_of = dict(self._parents())
        if account_id not in parent_of:
            raise NotFound(f"account {account_id!r} does not exist")
        found = [account_id]
        while (parent := parent_of.get(found[-1])) is not None and parent not in found:
            found.append(parent)
        return found

    # -------------------------------------------------------------------- keys

    def create_key(self, key: ApiKey, secret_hash: bytes) -> ApiKey:
        with self._lock:
            if key.account_id is not None:
                self._require("accounts", "account", [key.account_id])
            if self._ids("keys", [key.id]):
                raise Conflict(f"key id {key.id!r} is already taken")
            insert_rows(
                self.transport,
                "keys",
                (
                    "id",
                    "account",
                    "name",
                    "prefix",
                    "scopes",
                    "secret_hash",
                    "lookup",
                    "created_at",
                    "seq",
                    "version",
                ),
                [
                    (
                        key.id,
                        key.account_id,
                        key.name,
                        key.prefix,
                        ",".join(sorted(s.value for s in key.scopes)),
                        secret_hash.hex(),
                        secret_hash[:LOOKUP_BYTES].hex(),
                        int(key.created_at.timestamp() * 1000),
                        self._seqs(1),
                        1,
                    )
                ],
            )
        return self.get_key(key.id)

    def _keys(self, where: str) -> list[tuple[ApiKey, bytes]]:
        rows = self.transport.query(
            f"SELECT {_KEY_COLUMNS} FROM keys FINAL WHERE {where} ORDER BY seq"
        )
        return [(key_from_row(tuple(row)), bytes.fromhex(row[7])) for row in rows]

    def get_key(self, key_id: str) -> ApiKey:
        found = self._keys(f"id = {literal(key_id)}")
        if not found:
            raise NotFound(f"key {key_id!r} does not exist")
        return found[0][0]

    def find_keys_by_lookup(self, lookup: bytes) -> list[tuple[ApiKey, bytes]]:
        return self._keys(f"lookup = {literal(lookup.hex())}")

    def list_keys(self, account_id: str | None) -> list[ApiKey]:
        where = "account IS NULL" if account_id is None else f"account = {literal(account_id)}"
        return [key for key, _ in self._keys(where)]

    def export_keys(self) -> list[tuple[ApiKey, bytes]]:
        return self._keys("1")

    def revoke_key(self, key_id: str) -> ApiKey:
        with self._lock:
            # A newer version of the row, revoked; a key revoked before keeps its first date.
            columns = (
                "id, account, name, prefix, scopes, secret_hash, lookup, created_at, seq,"
                " coalesce(revoked_at, {now}), version + 1"
            )
            selected = columns.format(now=_now_ms())
            before = self.transport.query(
                f"SELECT count() FROM keys FINAL WHERE id = {literal(key_id)}"
            )
            if not before or not before[0][0]:
                raise NotFound(f"key {key_id!r} does not exist")
            self.transport.command(
                f"INSERT INTO keys (id, account, name, prefix, scopes, secret_hash, lookup,"
                f" created_at, seq, revoked_at, version) SELECT {selected} FROM keys FINAL"
                f" WHERE id = {literal(key_id)}"
            )
        return self.get_key(key_id)

    # ------------------------------------------------------------------ events

    def append(self, events: Sequence[Event]) -> AppendResult:
        if not events:
            return AppendResult(0, 0)
        # A name never seen is looked up before the batch joins a group, so that it fails
        # alone, saying which. Names seen before are looked up again by the group's writer
        # once they are stale (_names_gone), not here: a lookup here waits for the INSERT under
        # way (a chDB session runs one statement at a time), 40 to 94 ms per batch with 4
        # clients, and the batch then misses the group that INSERT's end starts.
        self._require("accounts", "account", [e.account_id for e in events], recheck=False)
        keys = [e.key_id for e in events if e.key_id is not None]
        self._require("keys", "key", keys, recheck=False)
        with self._appending_lock:
            self._appending += 1
        try:
            return self._group_commit.submit(Prepared(events, self._hash_ids), len(events))
        finally:
            with self._appending_lock:
                self._appending -= 1

    def _write_group(self, batches: Sequence[Prepared]) -> list[AppendResult | BaseException]:
        """The batches of one group commit (chappend.py): one dedupe lookup, one INSERT of
        their new events. Should the INSERT fail, every batch of the group fails with it,
        each whole."""
        group = Group(batches)
        with self._lock:
            gone = self._names_gone(batches)
            kept = [b for i, b in enumerate(batches) if i not in gone] if gone else batches
            results: list[AppendResult] = []
            if kept:
                if gone:  # rare: another process deleted an account this one remembered
                    group = Group(kept)
                results, picks = sort_out(kept, self._stored_digests(group), len(group.pairs))
                accepted = sum(r.accepted for r in results)
                if accepted:
                    columns = group_columns(kept, picks, self._seqs(accepted))
                    if self.folder is not None:  # the unit's writer (chfold.py)
                        columns["writer"] = [self.folder.writer] * accepted
                    if self.id_index is not None:  # before: a failed INSERT may store some
                        # The group's every id: those not new are stored already.
                        self.id_index.add(group.ids, group.id_hashes)
                    self.transport.insert_columns("events", columns, token(columns))
                    if self.folder is not None:
                        self.folder.wrote()
                    if min(columns["ts"]) < _now_ms() - VALUES_HISTORY_MS:
                        self.values_written = time.monotonic()  # history's values, in parts
        written = iter(results)
        return [gone[i] if i in gone else next(written) for i in range(len(batches))]

    def _names_gone(self, batches: Sequence[Prepared]) -> dict[int, NotFound]:
        """Once what this process knows of accounts and keys is stale, the group's are looked
        up again (one query per table, in the lock the group holds anyway), the rest
        forgotten; a batch naming one no longer there (deleted by another process) fails,
        alone, by its index in the group."""
        if not row_ids_stale(self._known_since):
            return {}
        named = [({a for a, _ in b.pairs}, {k for k in b.columns["key"] if k}) for b in batches]
        accounts = sorted(set().union(*(a for a, _ in named)))
        keys = sorted(set().union(*(k for _, k in named)))
        self._known = {"accounts": self._ids("accounts", accounts), "keys": self._ids("keys", keys)}
        self._known_since = time.monotonic()
        gone: dict[int, NotFound] = {}
        for index, (batch_accounts, batch_keys) in enumerate(named):
            for noun, table, names in (
                ("account", "accounts", batch_accounts),
                ("key", "keys", batch_keys),
            ):
                missing = sorted(names - self._known[table])
                if missing and index not in gone:
                    gone[index] = NotFound(f"{noun} {missing[0]!r} does not exist")
        return gone

    def _stored_digests(self, group: Group) -> dict[tuple[str, str], str]:
        """The payload digests of the group's (account, id) pairs already stored
        (stored_digests_sql). A stored id of the group under another of its accounts is
        dropped here. In chDB mode only the ids this process may have stored are asked
        (chidindex.py): none, for a group of new ids, and then no statement at all."""
        ids = group.ids
        maybe = None if self.id_index is None else self.id_index.maybe_stored(ids, group.id_hashes)
        if maybe is not None:
            if not maybe:
                return {}
            ids = maybe
        rows = self.transport.query(stored_digests_sql(group.accounts, ids))
        asked = group.pairs
        return {
            (account, event_id): digest
            for account, event_id, digest in rows
            if (account, event_id) in asked
        }

    def aggregate(self, spec: AggregateSpec) -> list[AggregateRow]:
        return self.aggregate_columns(spec).rows()

    def plans(self, spec: AggregateSpec) -> list[Plan]:
        """The statements of a question, reading each table chupgrade.py backfills only once
        it is complete. Kept for the question asked again over the same windows (the very
        tuple: the engine keeps a recent range's windows, engine._kept_cuts): planning a
        2,160-hour report looks at every window three times, 1 ms of its 21 (round 14)."""
        values_complete = self.distinct_values.ready()
        if values_complete != self._values_complete:
            self._values_complete = values_complete
            if values_complete:  # this process's backfill's parts, or another's
                self.values_written = time.monotonic()
        tables = (
            self.hour_sets.ready(),
            self.distinct_hours is not None and self.distinct_hours.ready(),
            self.latest_hours.ready(),
            any(g.table != LEGACY_LATEST for g in self.legacy),
            values_complete,
            self.count_value_rows,
            self.keyed_latest,
            time.monotonic() - self.values_written < VALUES_PARTS_S,
        )
        asked = (replace(spec, windows=()), tables)
        kept = self._plans.get(asked)
        # The windows are held by the kept entry, so no other tuple can take their id.
        if kept is not None and kept[0] is spec.windows:
            return list(kept[1])
        hour_sets, distinct_hours, latest_hours, coarse_tables, distinct_values = tables[:5]
        count_rows, keyed, values_parts = tables[5:]
        plans = plan_aggregate(
            spec,
            hour_sets=hour_sets,
            distinct_hours=distinct_hours,
            latest_hours=latest_hours,
            coarse_tables=coarse_tables,
            distinct_values=distinct_values,
            count_rows=count_rows,
            keyed_latest=keyed,
            values_parts=values_parts,
        )
        if len(self._plans) >= PLANS_KEPT:
            self._plans.clear()  # a bound on memory: planned again when asked
        self._plans[asked] = (spec.windows, tuple(plans))
        return plans

    def aggregate_columns(self, spec: AggregateSpec) -> AggregateColumns:
        if not spec.windows:
            return AggregateColumns([], [], [])
        self.fold_waiting()
        plans = self.plans(spec)
        if len(plans) == 1:  # the usual question: its result read by columns
            (plan,) = plans
            if isinstance(plan, RaggedPlan):
                return self._ragged(spec, plan)
            return self._answer(spec, plan)
        # Distinct counts beside other measures fill the same cells from several statements.
        rows = run_plans(plans, lambda plan: self.transport.query(plan.sql), len(spec.measures))
        return AggregateColumns.from_rows(rows)

    def _answer(self, spec: AggregateSpec, plan: Plan) -> AggregateColumns:
        """The answer of a question's only statement, by set where it is a SetsPlan."""
        if isinstance(plan, SetsPlan):
            return self._by_sets(spec, plan)
        return decode_columns(spec, plan, self.transport.query_columns(plan.sql))

    def _ragged(self, spec: AggregateSpec, plan: RaggedPlan) -> AggregateColumns:
        """A range starting or ending inside an hour (chplan.RaggedPlan): its whole hours by
        the statement a whole range takes, then its ragged ends from the raw events, one
        after the other (each transport serialises its statements). Each window is in one
        answer only, so an event written between the two is in one of them or neither, as
        between two askings; one acknowledged before the question is in both's tables."""
        assert plan.whole is not None and plan.ends is not None
        whole = self._answer(spec, plan.whole)
        ends = self._answer(spec, plan.ends)
        return AggregateColumns(
            whole.windows + ends.windows, whole.groups + ends.groups, whole.values + ends.values
        )

    def _by_sets(self, spec: AggregateSpec, plan: SetsPlan) -> AggregateColumns:
        """A grouped or tagged report read by set (chplan.SetsPlan): each dimension and tag
        set's members looked up the first time one of its ids is seen, and kept (an id is
        the hash of its sorted members, so they never change); by the values where the sets
        cannot answer (too many rows or sets, two sets of one cell), and from then on for
        the same accounts, metric, groups and tags."""
        asked = (spec.accounts, spec.metric, spec.group_by, spec.tags)
        if asked not in self._by_value:
            columns = self.transport.query_columns(plan.sql)
            grouped = bool(spec.group_by)
            dims: dict[int, Any] | None = {}
            tags: dict[int, Any] | None = {}
            if grouped:
                dims = self._members(self._sets, columns, 1, plan.lookup, dict)
            if spec.tags and dims is not None:
                tags = self._members(
                    self._tagsets, columns, 1 + grouped, plan.tag_lookup, frozenset
                )
            if dims is None or tags is None:  # too many sets not seen yet
                answer = None
            elif None in dims.values() or None in tags.values():
                # A set gone between the two statements (a void, an account deleted):
                # this answer by the values, the next by sets again.
                return self._by_values(spec, plan)
            else:
                answer = decode_sets(spec, plan, columns, dims, tags)
            if answer is not None:
                return answer
            if len(self._by_value) >= SETS_KEPT:
                self._by_value.clear()
            self._by_value.add(asked)
        return self._by_values(spec, plan)

    def _members(
        self,
        kept: dict[int, Any],
        columns: list[list[Any]],
        position: int,
        lookup: tuple[str, str],
        members: Callable[[Any], Any],
    ) -> dict[int, Any] | None:
        """The members of each set whose id is in the answer's column at ``position`` (None
        for a set no longer found), from those ``kept`` or looked up once and kept; None
        when more than SETS_LOOKED_UP are not kept yet. This answer's sets are taken from
        the kept ones once: another thread may forget them meanwhile (SETS_KEPT)."""
        # Each id once by a C loop, then only the few sets looked up: a statement per row
        # took 0.5 ms of an hourly report's 10,800 rows (round 14).
        sets: dict[int, Any] = dict.fromkeys(columns[position]) if columns else {}
        for found in sets:
            sets[found] = kept.get(found)
        unseen = [s for s, found in sets.items() if found is None]
        if len(unseen) > SETS_LOOKED_UP:
            return None
        if unseen:
            head, tail = lookup
            rows = self.transport.query(head + ", ".join(map(str, unseen)) + tail)
            looked_up = {int(s): members(found) for s, found in rows}
            sets.update(looked_up)
            if len(kept) + len(looked_up) > SETS_KEPT:
                kept.clear()  # a bound on memory: looked up again when seen
            kept.update(looked_up)
        return sets

    def _by_values(self, spec: AggregateSpec, plan: SetsPlan) -> AggregateColumns:
        return decode_columns(spec, plan, self.transport.query_columns(plan.by_value))

    def metrics_seen(
        self, accounts: Sequence[str], metric: str | None = None, *, dimensions: bool = True
    ) -> dict[str, list[str]]:
        if not accounts:
            return {}
        self.fold_waiting()
        where = f"account IN ({literals(accounts)})"
        if metric is not None:
            where += f" AND metric = {literal(metric)}"
        if not dimensions:  # the hours of values: a few rows per account, metric and hour
            table = HOUR_VALUES if self.hour_values.ready() else "rollup"
            rows = self.transport.query(f"SELECT DISTINCT metric FROM {table} WHERE {where}")
            return {str(row[0]): [] for row in rows}
        rows = self.transport.query(
            "SELECT metric, groupUniqArrayArray(mapKeys(dims)) FROM rollup"
            f" WHERE {where} GROUP BY metric"
        )
        return {str(row[0]): sorted(str(name) for name in row[1]) for row in rows}

    def fold_waiting(self) -> None:
        """On a database folding later, every acknowledged event (this process's or
        another's) folded into the rollups before they are read (chfold.py)."""
        if self.folder is not None:
            self.folder.fold_waiting()

    def count_events(self) -> int:
        return int(self.transport.query("SELECT count() FROM events")[0][0])

    def last_seq(self) -> int:
        rows = self.transport.query("SELECT max(seq) FROM events")
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def touched(
        self, after_seq: int, upto_seq: int, metrics: Sequence[str]
    ) -> list[tuple[str, str, int, int]]:
        if not metrics:
            return []
        rows = self.transport.query(
            "SELECT account, metric, min(ts), max(ts) FROM events"
            f" WHERE seq > {literal(after_seq)} AND seq <= {literal(upto_seq)}"
            f" AND metric IN ({literals(metrics)})"
            f" GROUP BY account, metric, intDiv(ts, {SLOT_MS})"
        )
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]

    def database_size(self) -> int:
        """Bytes the database's active parts occupy (for GET /metrics)."""
        rows = self.transport.query(
            "SELECT sum(bytes_on_disk) FROM system.parts"
            " WHERE database = currentDatabase() AND active"
        )
        return int(rows[0][0]) if rows else 0

    def iter_events(
        self,
        accounts: Sequence[str] | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Iterator[Event]:
        where = []
        if accounts is not None:
            if not accounts:
                return
            where.append(f"account IN ({literals(accounts)})")
        if start_ms is not None:
            where.append(f"ts >= {start_ms}")
        if end_ms is not None:
            where.append(f"ts < {end_ms}")
        # Page by arrival order, so a long export never holds every row at once.
        last = -1
        while True:
            page = self.transport.query(
                "SELECT id, account, metric, ts, value, billable, key, dims, tags, seq"
                f" FROM events WHERE {' AND '.join([*where, f'seq > {last}'])}"
                f" ORDER BY seq LIMIT {EXPORT_PAGE}"
            )
            for row in page:
                yield Event(
                    id=row[0],
                    account_id=row[1],
                    metric=row[2],
                    ts_ms=int(row[3]),
                    value=float(row[4]),
                    billable=bool(row[5]),
                    key_id=row[6] or None,
                    dimensions=row[7],
                    tags=frozenset(row[8]),
                )
            if len(page) < EXPORT_PAGE:
                return
            last = int(page[-1][9])

    def _amend(self, selector: VoidSelector, amend: Amendment, void_id: str) -> str:
        """An amend's replacement inserts an id too: noted in the ids' index before it is
        (chidindex.py), as a group's ids are."""
        if self.id_index is not None and len(selector.ids) == 1:
            self.id_index.add([amend.replacement_id(selector.ids[0], void_id)])
        return super()._amend(selector, amend, void_id)


def stored_digests_sql(accounts: Sequence[str], ids: Sequence[str]) -> str:
    """The dedupe lookup's statement: which of ``ids`` are stored under one of ``accounts``,
    with their digests. The ids travel as one data literal (format(), one JSON array), the
    accounts as a short list: a set of strings is found far faster than a set of (account,
    id) tuples (1.3 to 2.8 times, docs/clickhouse.md, "Ingest, round 8"). The ids are a
    PREWHERE: only the id column is read in the granules the key keeps, and the account
    and digest only for an id found, so a batch of new ids never reads them (a batch of
    10,000 random ids among 10M: 451 against 244 ms, "Ingest, round 16"). Either layout of
    event_ids (chschema.ids_by_id) is narrowed by its key from these two conditions."""
    listed = msgspec.json.encode([ids]).decode()
    return (
        "SELECT account, id, digest FROM event_ids"
        f" PREWHERE id IN (SELECT i FROM format(JSONCompactColumns, 'i String', {literal(listed)}))"
        f" WHERE account IN ({literals(accounts)})"
    )
