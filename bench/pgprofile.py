"""Where a batch's time goes in PostgreSQL: `python -m bench.pgprofile [--stored N]`.

Loads N of the bench's events (a 120-day backfill over 1,000 Zipf accounts) into the PostgreSQL
store in process, on the bench's durable cluster, then appends more batches of 1,000 and
reports, per batch: the server backend's CPU (from /proc), the WAL it wrote, the store's own
Python time, and the rollup rows updated in place (HOT) or not. Once for batches in the
bench's order (a backfill), once for the same events sorted by time (live traffic). Then
`EXPLAIN (ANALYZE, BUFFERS, WAL)` of one batch statement and of one fold, rolled back.

Where batches leave their events waiting to be folded (store/pgfold.py), the bench folds
them itself every ``--fold-every`` batches, on the same backend, and reports the folds' CPU
apart: the server's CPU per event is the batches' and the folds' together. (Run with an
older version on PYTHONPATH, it measures that version: its batches fold their own.)

With ``--question``, it then times the heavy account's 90-day New York daily lookups report
in process, with the read of the waiting events and without it, alternating, with none and
with some of the account's events waiting (without the read those answers are wrong: that
is the read's price).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
import zoneinfo
from collections.abc import Sequence
from typing import Any

import numpy as np
from msgspec.structs import replace

from bench import generate as g
from bench import render
from bench.pgstore import StoreCluster
from usagemeter.model import Account, ApiKey, Event, Scope
from usagemeter.store import postgres as pg
from usagemeter.store.base import AggregateSpec, Measure, Window

try:
    from usagemeter.store import pgfold
except ImportError:  # a version whose batches fold their own rollups
    pgfold = None  # type: ignore[assignment]

TICKS = os.sysconf("SC_CLK_TCK")


def events_of(chunk: g.Events, start_ms: int) -> list[Event]:
    accounts = [g.account_id(a) for a in range(g.ACCOUNTS)]
    out = []
    for i, ts, a, k, m, value, billable, dim, dim2, tags in render.rows(chunk, start_ms):
        out.append(
            Event(
                id=f"e{i}",
                account_id=accounts[a],
                metric=g.METRICS[m],
                ts_ms=ts,
                value=float(value),
                billable=bool(billable),
                key_id=g.key_id(a, k),
                dimensions=g.dimensions(m, a, dim, dim2),
                tags=frozenset(g.tag_names(tags)),
            )
        )
    return out


def open_store(url: str) -> pg.PostgresStore:
    """The store on ``url``, with the bench's accounts and keys."""
    # Folds only when measure() asks, so that their CPU is counted on its backend.
    store = pg.PostgresStore(url, background_fold=False) if pgfold else pg.PostgresStore(url)
    now = dt.datetime.now(dt.UTC)
    for a in range(g.ACCOUNTS):
        store.create_account(Account(id=g.account_id(a), name=g.account_id(a)))
        for k in range(g.KEYS_PER_ACCOUNT):
            key = ApiKey(g.key_id(a, k), g.account_id(a), "k", "ak_", frozenset([Scope.READ]), now)
            store.create_key(key, f"{a}/{k}".encode().ljust(32, b"."))
    return store


def backend_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Spy:
    """A connection that hands the batch statement's parameters to `seen`."""

    def __init__(self, conn: pg.Conn, seen: list[Any]) -> None:
        self.conn, self.seen = conn, seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def execute(self, sql: Any, params: Any = None, **kw: Any) -> Any:
        if sql is pg.APPEND_SQL:
            self.seen.append(params)
        return self.conn.execute(sql, params, **kw)


def stats(conn: pg.Conn) -> dict[str, tuple[int, int]]:
    rows = conn.execute(
        "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
        " WHERE relname LIKE 'rollup%%'"
    ).fetchall()
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def measure(
    store: pg.PostgresStore, batches: Sequence[list[Event]], label: str, fold_every: int
) -> None:
    with store._pool.connection() as conn:
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        # Statistics are sent at transaction end, and read once per transaction.
        conn.execute("SELECT pg_stat_clear_snapshot()")
        before_stats = stats(conn)
        lsn0 = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        if pgfold:
            pgfold.fold(conn, wait=True)  # nothing left over from the load
        cpu0, t0, py, folding = backend_cpu(pid), time.perf_counter(), 0.0, 0.0
        for n, batch in enumerate(batches, 1):
            p0 = time.process_time()
            store._append(conn, [batch])
            py += time.process_time() - p0
            if pgfold and (n % fold_every == 0 or n == len(batches)):
                f0 = backend_cpu(pid)
                pgfold.fold(conn, wait=True)
                folding += backend_cpu(pid) - f0
        wall = time.perf_counter() - t0
        cpu = backend_cpu(pid) - cpu0
        wal = conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (str(lsn0),)).fetchone()[0]  # type: ignore[index]
        time.sleep(0.6)  # let the statistics collector catch up
        conn.execute("SELECT pg_stat_clear_snapshot()")
        after = stats(conn)
    n = sum(len(b) for b in batches)
    print(
        f"{label}: {len(batches)} batches: server CPU {cpu / n * 1e6:.1f} us/event"
        f" ({folding / n * 1e6:.1f} of it folding, every {fold_every} batches),"
        f" client CPU {py / n * 1e6:.1f} us/event, wall {wall / n * 1e6:.1f} us/event,"
        f" WAL {int(wal) / n:.0f} B/event"
    )
    for table, (upd, hot) in sorted(after.items()):
        u, h = upd - before_stats.get(table, (0, 0))[0], hot - before_stats.get(table, (0, 0))[1]
        print(f"   {table}: {u} updates, {h} HOT")


def explain(store: pg.PostgresStore, batch: list[Event]) -> None:
    seen: list[Any] = []
    with store._pool.connection() as conn:
        conn.execute("BEGIN")
        try:
            # Run through the store to get its parameters, in a transaction rolled back; then
            # the same statement again, explained, on fresh ids.
            store._append(Spy(conn, seen), [batch])  # type: ignore[arg-type]
            conn.execute("ROLLBACK")
            conn.execute("BEGIN")
            plan = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS, WAL, COSTS OFF) " + pg.APPEND_SQL, seen[0]
            ).fetchall()
        finally:
            conn.execute("ROLLBACK")
    print("\n".join(r[0] for r in plan))


def explain_fold(store: pg.PostgresStore, batches: Sequence[list[Event]]) -> None:
    """`EXPLAIN (ANALYZE, BUFFERS, WAL)` of one fold of ``batches``, rolled back: what each
    rollup's upsert costs, node by node."""
    if pgfold is None:
        return
    with store._pool.connection() as conn:
        conn.execute("BEGIN")
        try:
            for batch in batches:
                store._append(conn, [batch])
            plan = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS, WAL, COSTS OFF) " + pgfold.FOLD_SQL
            ).fetchall()
        finally:
            conn.execute("ROLLBACK")
    print(f"one fold of {sum(len(b) for b in batches):,} events:")
    print("\n".join(r[0] for r in plan))


def question(store: pg.PostgresStore, end_ms: int, rounds: int = 40) -> None:
    """The heavy report with and without the read of the waiting events, alternating."""
    ny = zoneinfo.ZoneInfo("America/New_York")
    last = dt.datetime.fromtimestamp(end_ms / 1000, ny).replace(hour=0, minute=0, second=0)
    days = [last + dt.timedelta(days=1 - 90 + i) for i in range(91)]
    windows = tuple(
        Window(i, int(days[i].timestamp() * 1000), int(days[i + 1].timestamp() * 1000))
        for i in range(90)
    )
    heavy = g.account_id(0)
    spec = AggregateSpec((heavy,), "lookups", windows, (Measure("count"),))
    planned = pg.plan_aggregate

    def without(*args: Any, **kw: Any) -> Any:
        return planned(*args, **{**kw, "pending": None})

    store.fold(wait=True)
    for waiting in (0, 2_000, 20_000):
        fresh = [
            Event(f"q{waiting}-{i}", heavy, "lookups", windows[-1].end_ms - 1 - i * 1000)
            for i in range(waiting)
        ]
        for i in range(0, waiting, 1000):
            store.append(fresh[i : i + 1000])
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for read in (True, False):
                pg.plan_aggregate = planned if read else without  # type: ignore[assignment]
                t0 = time.perf_counter()
                store.aggregate(spec)
                times[read].append(time.perf_counter() - t0)
        pg.plan_aggregate = planned  # type: ignore[assignment]
        with_read, plain = (statistics.median(times[r]) * 1000 for r in (True, False))
        print(
            f"heavy 90-day New York report, {waiting:,} of its events waiting: {with_read:.2f} ms"
            f" reading them, {plain:.2f} ms not ({with_read / plain:.2f}x)"
        )
        store.fold(wait=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pgprofile", description=__doc__)
    p.add_argument("--stored", type=int, default=200_000)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--explain", action="store_true")
    p.add_argument("--question", action="store_true", help="time the heavy report too")
    p.add_argument(
        "--fold-every",
        type=int,
        default=5,
        help="batches between folds (default 5: a run of"
        " 5,000 events, what half a second of two servers' live traffic leaves waiting)",
    )
    args = p.parse_args(argv)
    extra = 2 * args.batches * 1000 + 1000
    chunk = g.all_events(1, args.stored + extra)
    start_ms = g.window_start_ms(dt.datetime.now(dt.UTC).date())
    events = events_of(chunk, start_ms)
    cluster = StoreCluster()
    try:
        store = open_store(cluster.url)
        t0 = time.perf_counter()
        for i in range(0, args.stored, 1000):
            store.append(events[i : i + 1000])
        if pgfold:
            store.fold(wait=True)
        print(f"loaded {args.stored:,} in {time.perf_counter() - t0:.1f} s")
        cluster.execute("CHECKPOINT")
        rest = events[args.stored :]
        backfill = rest[: args.batches * 1000]
        live = sorted(rest[args.batches * 1000 : 2 * args.batches * 1000], key=lambda e: e.ts_ms)
        # Live traffic: the same kinds of events, arriving in time order over a shorter span.
        span = live[-1].ts_ms - live[0].ts_ms
        live_ts = np.linspace(0, min(span, 3_600_000), len(live)).astype(np.int64)
        end = max(e.ts_ms for e in events)
        live = [
            Event(
                e.id,
                e.account_id,
                e.metric,
                end + int(t),
                e.value,
                e.billable,
                e.key_id,
                e.dimensions,
                e.tags,
            )
            for e, t in zip(live, live_ts, strict=True)
        ]
        every = args.fold_every
        backfills = [backfill[i : i + 1000] for i in range(0, len(backfill), 1000)]
        measure(store, backfills, "backfill", every)
        measure(
            store, [live[i : i + 1000] for i in range(0, len(live), 1000)], "live, 1 hour", every
        )
        if args.explain:
            explain(store, events[-1000:])
            # Live traffic going on: the same events again under new ids, a fold's run.
            again = [replace(e, id=f"again-{e.id}") for e in live[: every * 1000]]
            explain_fold(store, [again[i : i + 1000] for i in range(0, len(again), 1000)])
        if args.question and pgfold:
            question(store, max(e.ts_ms for e in events))
        store.close()
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
