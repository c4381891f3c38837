"""usagemeter on ClickHouse (chDB) beside usagemeter on SQLite and the raw chDB peer: the same
generated events loaded into each in batches of 10,000 (ours through the storage interface),
then the heavy account's questions asked of each, every answer checked equal to SQLite's (the
peer's overall total, which is all its GROUPING SETS share with ours).

    python -m bench.chstore --events 1000000 [--store chdb:///dir] [--runs 5] [--no-sqlite]
                            [--slots-only] [--hour-view-ab] [--ingest-only] [--clients N]

The peer (bench/peers/chdb_peer.py: raw events in one MergeTree, no dedupe, no rollups, no
fsync) runs in the ClickHouse store's own chDB session, in a database of its own (chDB opens
one directory per process), so both pay the same engine's fixed costs. Figures are medians
of warm runs, in milliseconds, in this process (no HTTP).

``--slots-only`` adds a column: the same ClickHouse store planning without its hour table of
dimension and tag sets (the store before it), asked in turn with the others. ``--hour-view-ab``
loads a second ClickHouse store in the same session without that table's view, batches taken
in turn with the first, and prints both ingest rates: what the view costs an append.
``--ingest-only`` loads the ClickHouse store and the peer, prints their rates and where an
append's time went, and asks no questions (a code change's before and after: run it on each,
in turn). ``--clients N`` appends to the ClickHouse store from N threads at once, as a
server's concurrent requests do: batches that queue together share an INSERT.
``--ceiling`` (with ``--ingest-only``) drops the views that feed the rollups once the store is
open, so that an INSERT writes the events and their ids only, fsynced as ever: what an
append could reach were the rollups folded afterwards (a measurement, not a store: its
questions would be wrong, so none is asked).
``--fold-later`` creates the ClickHouse store's database folding its rollups after the
acknowledgement (``?fold=later``, chfold.py): the acknowledged rate, and beside it the rate
with everything folded too (until the last unit is folded, by the store's fold thread and
then the barrier of a question). ``--after-append N`` asks the 90-day daily requests N times,
each right after an append of 100 events, and prints its median: what a question's barrier
costs (a fold of what waits, in fold-later mode), beside the same question with nothing
written since.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.peers import chdb_peer
from bench.questions import Question
from bench.timing import in_threads
from usagemeter.engine import Engine
from usagemeter.model import Account, Event, Query, Result
from usagemeter.store import open_store
from usagemeter.store.base import Store
from usagemeter.store.chschema import GRAINS, HOUR_SETS, TABLES
from usagemeter.store.chtransport import ChdbTransport
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.timewindows import Granularity

ANCHOR = datetime(2025, 6, 1, tzinfo=UTC)  # the window's end
DAYS = 120
ACCOUNTS = 100
BATCH = 10_000
GRAIN_TABLES = tuple(grain.table for grain in GRAINS)
STATUSES = ("200", "200", "200", "201", "400", "404", "500")


# The views of the rollups: what --ceiling drops (event_ids' view stays, dedupe reads it).
CEILING_DROPS = tuple(f"{table}_mv" for table in GRAIN_TABLES)


def generate(count: int, seed: int = 1) -> Iterator[Event]:
    """Events over the last 120 days; account 0 holds about a third of them (the heavy one)."""
    rng = random.Random(seed)
    start_ms = int((ANCHOR - timedelta(days=DAYS)).timestamp() * 1000)
    span = DAYS * 86_400_000
    for i in range(count):
        account = 0 if rng.random() < 0.33 else rng.randrange(1, ACCOUNTS)
        kind = rng.random()
        ts = start_ms + rng.randrange(span)
        if kind < 0.6:
            yield Event(
                id=f"r{i}",
                account_id=f"acct-{account}",
                metric="requests",
                ts_ms=ts,
                dimensions={"status": rng.choice(STATUSES)},
                tags=frozenset({"prod"} if rng.random() < 0.7 else {"staging"}),
            )
        elif kind < 0.9:
            yield Event(
                id=f"s{i}",
                account_id=f"acct-{account}",
                metric="Sessions",
                ts_ms=ts,
                dimensions={"session_id": f"sess-{rng.randrange(200_000)}"},
            )
        else:
            yield Event(
                id=f"b{i}",
                account_id=f"acct-{account}",
                metric="StorageBytes",
                ts_ms=ts,
                value=float(rng.randrange(1, 10**9)),
            )


def batches(count: int) -> Iterator[list[Event]]:
    """The generated events in batches of BATCH."""
    batch: list[Event] = []
    for event in generate(count):
        batch.append(event)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def load(
    store: Store, count: int, phases: dict[str, float] | None = None, clients: int = 1
) -> float:
    """Events per second of appending all of them in batches of BATCH, from ``clients``
    threads at once (each takes the next batch when its last is acknowledged); on a
    ClickHouse store, ``phases`` collects the seconds spent in each step of an append."""
    for n in range(ACCOUNTS):
        store.create_account(Account(f"acct-{n}", f"Account {n}"))
    timing = phases is not None and isinstance(store, ClickHouseStore)
    if timing:
        _time_phases(store, phases)
    if clients > 1:
        # The batches made beforehand: generating them is not the store's time.
        elapsed = append_concurrently(store, list(batches(count)), clients)
    else:
        elapsed = 0.0
        for batch in batches(count):
            began = time.perf_counter()
            store.append(batch)
            elapsed += time.perf_counter() - began
    if timing:
        phases["append, in all"] = elapsed
    return count / elapsed


def append_concurrently(store: Store, sent: Sequence[list[Event]], clients: int) -> float:
    """Seconds from the first of ``sent`` appended to the last acknowledged, from ``clients``
    threads at once, each taking the next batch when its last is acknowledged."""
    queue = list(sent)[::-1]

    def client() -> None:
        while queue:
            try:
                batch = queue.pop()
            except IndexError:  # another client took the last one
                return
            store.append(batch)

    return in_threads(client, clients)


# The steps of ClickHouseStore.append, by the methods that do them; the rest is Python
# (digests, columns, JSON encoding).
REST = "the rest: Python (digests, columns, encoding)"
PHASES = {
    "_require": "accounts and keys checked",
    "_stored_digests": "dedupe lookup in event_ids",
    "insert_columns": "INSERT (events, and every view's table)",
    "insert": "INSERT (events, and every view's table)",  # its name before round 6
}


def _time_phases(store: ClickHouseStore, phases: dict[str, float]) -> None:
    for owner in (store, store.transport):
        for name, label in PHASES.items():
            method = getattr(owner, name, None)
            if method is None:
                continue

            def timed(
                *args: object, _method: Any = method, _label: str = label, **kwargs: object
            ) -> object:
                began = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    phases[_label] = phases.get(_label, 0.0) + time.perf_counter() - began

            setattr(owner, name, timed)


class Peer:
    """The raw chDB peer beside a chDB store, in the store's session: database ``bench``."""

    def __init__(self, store: Store) -> None:
        if not isinstance(store, ClickHouseStore) or not isinstance(store.transport, ChdbTransport):
            raise SystemExit("the raw chDB peer needs a chdb:/// store")
        self.transport = ChdbTransport(store.transport._shared.path, "bench")
        self.transport.command(chdb_peer.SCHEMA)

    def load(self, count: int) -> float:
        """Events per second of inserting them in batches of BATCH, as the store was."""
        elapsed = 0.0
        for batch in batches(count):
            began = time.perf_counter()
            columns = {
                "account": [e.account_id for e in batch],
                "key": [""] * len(batch),
                "metric": [e.metric for e in batch],
                "ts": [e.ts_ms / 1000 for e in batch],
                "value": [e.value for e in batch],
                "billable": [True] * len(batch),
                "dims": [e.dimensions for e in batch],
                "tags": [[*e.tags] for e in batch],
            }
            self.transport.insert_columns("events", columns)
            elapsed += time.perf_counter() - began
        # As the peer does after its load (bench/peers/chdb_peer.py): one part to read.
        self.transport.command("OPTIMIZE TABLE events FINAL")
        return count / elapsed

    def total(self, question: Question) -> float | None:
        """The question's overall total: the GROUPING SETS row with neither bucket nor group."""
        sql = chdb_peer.sql(question).split(" SETTINGS ")[0]
        for start, group, value in self.transport.query(sql + " SETTINGS group_by_use_nulls = 1"):
            if start is None and group is None:
                return None if value is None else float(value)
        return None

    def close(self) -> None:
        self.transport.command("DROP TABLE events")
        self.transport.close()


def peer_question(label: str, query: Query) -> Question:
    """The peer's form of one of our questions."""
    aggregation = {"Sessions": "unique_count", "StorageBytes": "latest"}.get(query.metric, "count")
    return Question(
        name=label,
        label="heavy",
        account=query.accounts[0],
        metric=query.metric,
        start=query.start,
        end=query.end,
        granularity="hour" if query.granularity is Granularity.HOUR else "day",
        tz=query.tz,
        aggregation=aggregation,
        tags=tuple(sorted(query.tags)),
        group_by=query.group_by[0] if query.group_by else None,
    )


def questions() -> dict[str, Query]:
    start, end = ANCHOR - timedelta(days=90), ANCHOR
    heavy = ("acct-0",)
    return {
        "90-day daily requests": Query(heavy, "requests", start, end),
        "90-day daily Sessions (distinct)": Query(heavy, "Sessions", start, end),
        "90-day hourly requests by status, New York": Query(
            heavy,
            "requests",
            start,
            end,
            Granularity.HOUR,
            "America/New_York",
            group_by=("status",),
        ),
        "90-day daily requests tagged prod": Query(
            heavy, "requests", start, end, tags=frozenset({"prod"})
        ),
        "90-day daily StorageBytes (latest)": Query(heavy, "StorageBytes", start, end),
    }


def slots_only(store: Store, query: Query) -> Result:
    """The store's answer planned without its hour table of dimension and tag sets."""
    assert isinstance(store, ClickHouseStore)
    ready = store.hour_sets.ready
    store.hour_sets.ready = lambda: False  # type: ignore[method-assign]
    try:
        return Engine(store).run(query)
    finally:
        store.hour_sets.ready = ready  # type: ignore[method-assign]


def hour_view_ab(store: Store, count: int) -> tuple[float, float]:
    """Events per second into ``store`` and into a store in the same session without the
    hour table's view, their batches taken in turn."""
    assert isinstance(store, ClickHouseStore) and isinstance(store.transport, ChdbTransport)
    without = ClickHouseStore(
        ChdbTransport(store.transport._shared.path, "nohourview"), store.side.path
    )
    without.transport.command(f"DROP VIEW {HOUR_SETS}_mv")
    targets = [store, without]
    for target in targets:
        for n in range(ACCOUNTS):
            target.create_account(Account(f"acct-{n}", f"Account {n}"))
    elapsed = [0.0, 0.0]
    for batch in batches(count):
        for i, target in enumerate(targets):
            began = time.perf_counter()
            target.append(batch)
            elapsed[i] += time.perf_counter() - began
    without.transport.command("DROP DATABASE nohourview")
    without.close()
    return count / elapsed[0], count / elapsed[1]


def after_append(store: Store, times: int) -> None:
    """The 90-day daily requests asked right after an append of 100 new events, and with
    nothing written since, in turn: medians in ms."""
    query = questions()["90-day daily requests"]
    after, quiet = [], []
    for n in range(times):
        store.append(
            [
                Event(id=f"late-{n}-{i}", account_id="acct-0", metric="requests", ts_ms=ts)
                for i, ts in enumerate(range(_ms(ANCHOR) - 100 * 60_000, _ms(ANCHOR), 60_000))
            ]
        )
        for timings in (after, quiet):
            began = time.perf_counter()
            Engine(store).run(query)
            timings.append((time.perf_counter() - began) * 1000)
    print(
        f"\n90-day daily requests: {statistics.median(after):.1f} ms right after an append of"
        f" 100 events, {statistics.median(quiet):.1f} ms asked again ({times} times, medians)"
    )


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def timed(runs: Sequence[Callable[[], object]], times: int) -> list[tuple[float, object]]:
    """Median milliseconds and last answer of each of ``runs``, warmed once, then called in
    turn ``times`` times: the machine's load then weighs on every system alike."""
    answers = [run() for run in runs]
    spent: list[list[float]] = [[] for _ in runs]
    for _ in range(times):
        for i, run in enumerate(runs):
            began = time.perf_counter()
            answers[i] = run()
            spent[i].append((time.perf_counter() - began) * 1000)
    return [(statistics.median(ms), answer) for ms, answer in zip(spent, answers, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chstore", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--store", help="the ClickHouse store (default: chDB in a temp dir)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite store")
    parser.add_argument(
        "--merged",
        action="store_true",
        help="merge the ClickHouse store's parts before the questions (OPTIMIZE ... FINAL),"
        " as the peer's are: the state a store reaches between bursts of ingest",
    )
    parser.add_argument(
        "--slots-only",
        action="store_true",
        help="add a column: the ClickHouse store without its hour table of dimension and tag sets",
    )
    parser.add_argument(
        "--hour-view-ab",
        action="store_true",
        help="load a second ClickHouse store without the hour table's view, batches in turn,"
        " and print both ingest rates (replaces the ClickHouse store's own load)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="append from this many threads at once (ClickHouse store; default 1)",
    )
    parser.add_argument(
        "--ingest-only",
        action="store_true",
        help="load the ClickHouse store and the peer only: their rates and an append's steps",
    )
    parser.add_argument(
        "--fold-later",
        action="store_true",
        help="create the ClickHouse store's database folding its rollups after the"
        " acknowledgement (?fold=later): the acknowledged rate and the rate folded too",
    )
    parser.add_argument(
        "--after-append",
        type=int,
        default=0,
        metavar="N",
        help="ask the 90-day daily requests N times right after an append of 100 events",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="with --ingest-only: drop the rollups' views, so an INSERT writes the events and"
        " their ids only (the ceiling of a store that folds its rollups afterwards)",
    )
    args = parser.parse_args(argv)
    if args.ceiling and not args.ingest_only:
        parser.error("--ceiling drops the rollups' views: add --ingest-only")
    if args.ingest_only:
        args.no_sqlite = True
    scratch = Path(tempfile.mkdtemp(prefix="usagemeter-bench-"))
    try:
        url = args.store or f"chdb:///{scratch}/chdb"
        if args.fold_later:
            url += ("&" if "?" in url else "?") + "fold=later"
        stores = {"ClickHouse": open_store(url)}
        if not args.no_sqlite:
            stores["SQLite"] = open_store(f"sqlite:///{scratch}/usage.db")
        phases: dict[str, float] = {}
        ours = stores["ClickHouse"]
        if args.ceiling and isinstance(ours, ClickHouseStore):
            for view in CEILING_DROPS:
                ours.transport.command(f"DROP VIEW IF EXISTS {view}")
        ab = None
        if args.hour_view_ab:
            ab = hour_view_ab(ours, args.events)
        rates = {
            name: ab[0]
            if ab and store is ours
            else load(store, args.events, phases, args.clients if store is ours else 1)
            for name, store in stores.items()
        }
        folded_too = None
        if isinstance(ours, ClickHouseStore) and ours.folder is not None:
            began = time.perf_counter()
            ours.fold_waiting()  # the rest of the fold, as a question's barrier would
            rest = time.perf_counter() - began
            folded_too = (args.events / (args.events / rates["ClickHouse"] + rest), rest)
        if args.merged and isinstance(ours, ClickHouseStore):
            for table in TABLES:
                ours.transport.command(f"OPTIMIZE TABLE {table} FINAL")
        peer = Peer(ours)
        peer_rate = peer.load(args.events)
        # As the server does once started (api/app.py): what exists now lives on, frozen, so
        # the collector's full passes do not walk it while the questions run.
        gc.collect()
        gc.freeze()
        names = [*stores, *(["ClickHouse, slots only"] if args.slots_only else []), "raw chDB peer"]
        clients = f", {args.clients} clients at once" if args.clients > 1 else ""
        ceiling = ", the rollups' views dropped (--ceiling)" if args.ceiling else ""
        print(f"{args.events:,} events, batches of {BATCH:,}{clients}{ceiling}\n")
        print("| | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        slots_rate = [ab[1] if ab else float("nan")] if args.slots_only else []
        figures = [f"{r:,.0f}" for r in [*rates.values(), *slots_rate, peer_rate]]
        print("| ingest, events/s | " + " | ".join(figures) + " |")
        if folded_too is not None:
            print(
                f"| folded too, events/s | {folded_too[0]:,.0f} (the fold's rest after the"
                f" last acknowledgement: {folded_too[1]:.1f} s) |"
            )
        for label, query in ({} if args.ingest_only else questions()).items():
            question = peer_question(label, query)
            runs: list[Callable[[], object]] = [
                *(lambda s=store, q=query: Engine(s).run(q) for store in stores.values()),
                *([lambda q=query: slots_only(ours, q)] if args.slots_only else []),
                lambda q=question: peer.total(q),
            ]
            measured = timed(runs, args.runs)
            results = [answer for _, answer in measured[:-1] if isinstance(answer, Result)]
            answers = [(r.buckets, r.totals, r.total) for r in results]
            peer_total = measured[-1][1]
            same = all(a == answers[0] for a in answers) and _close(
                peer_total if isinstance(peer_total, float) else None, answers[0][2][0]
            )
            cells = " | ".join(f"{ms:.1f} ms" for ms, _ in measured)
            print(f"| {label}{'' if same else ' **(answers differ)**'} | {cells} |")
        if args.after_append:
            after_append(ours, args.after_append)
        count = -(-args.events // BATCH)
        if ab:
            print(f"\ningest without the hour table's view: {ab[1]:,.0f} events/s")
        if phases:
            print(f"\nClickHouse: one append of {BATCH:,} events, mean ms per step\n")
            if args.clients > 1:  # steps under the store's lock; the rest ran beside them
                print("(clients at once: the rest is time no step of any append took)\n")
            done = sum(v for k, v in phases.items() if k in PHASES.values())
            rest = phases["append, in all"] - done
            for label, seconds in [*phases.items(), (REST, rest)]:
                print(f"- {label}: {seconds / count * 1000:.1f} ms")
        peer.close()
        for store in stores.values():
            store.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _close(peer: float | None, ours: float | None) -> bool:
    return abs((peer or 0.0) - (ours or 0.0)) < 1e-9


if __name__ == "__main__":
    raise SystemExit(main())
