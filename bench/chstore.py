"""usagemeter on ClickHouse (chDB) beside usagemeter on SQLite: the same generated events
loaded into both in batches of 10,000 through the storage interface, then the heavy account's
questions asked of both through the engine, every answer checked equal.

    python -m bench.chstore --events 1000000 [--store chdb:///dir] [--runs 5]

Figures are medians of warm runs, in milliseconds, in this process (no HTTP).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from usagemeter.engine import Engine
from usagemeter.model import Account, Event, Query, Result
from usagemeter.store import open_store
from usagemeter.store.base import Store
from usagemeter.timewindows import Granularity

ANCHOR = datetime(2025, 6, 1, tzinfo=UTC)  # the window's end
DAYS = 120
ACCOUNTS = 100
BATCH = 10_000
STATUSES = ("200", "200", "200", "201", "400", "404", "500")


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


def load(store: Store, count: int) -> float:
    """Events per second of appending all of them in batches of BATCH."""
    for n in range(ACCOUNTS):
        store.create_account(Account(f"acct-{n}", f"Account {n}"))
    batch: list[Event] = []
    elapsed = 0.0
    for event in generate(count):
        batch.append(event)
        if len(batch) == BATCH:
            began = time.perf_counter()
            store.append(batch)
            elapsed += time.perf_counter() - began
            batch = []
    if batch:
        began = time.perf_counter()
        store.append(batch)
        elapsed += time.perf_counter() - began
    return count / elapsed


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


def timed(run: Callable[[], Result], runs: int) -> tuple[float, Result]:
    result = run()  # warm
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chstore", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--store", help="the ClickHouse store (default: chDB in a temp dir)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="usagemeter-bench-"))
    try:
        stores = {
            "ClickHouse": open_store(args.store or f"chdb:///{scratch}/chdb"),
            "SQLite": open_store(f"sqlite:///{scratch}/usage.db"),
        }
        rates = {name: load(store, args.events) for name, store in stores.items()}
        print(f"{args.events:,} events, batches of {BATCH:,}\n")
        print("| | " + " | ".join(stores) + " |")
        print("|---|" + "---:|" * len(stores))
        print("| ingest, events/s | " + " | ".join(f"{r:,.0f}" for r in rates.values()) + " |")
        for label, query in questions().items():
            figures, answers = [], []
            for store in stores.values():
                ms, result = timed(lambda s=store, q=query: Engine(s).run(q), args.runs)
                figures.append(f"{ms:.1f} ms")
                answers.append((result.buckets, result.totals, result.total))
            same = "" if answers[0] == answers[1] else " **(answers differ)**"
            print(f"| {label}{same} | " + " | ".join(figures) + " |")
        for store in stores.values():
            store.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
