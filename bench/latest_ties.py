"""The cost of the latest value's rank, in process: `python -m bench.latest_ties [--events N]`.

Appends N of the bench's events to a new SQLite store, folds them in one run, asks the heavy
account's 90-day New York StorageBytes latest report (alone, with totals) and requests'
latest value by status with totals, both levels, then merges and asks again; prints the
fold's CPU, the merge's time and each question's median. Run it in turn with another
checkout's package first on PYTHONPATH (round 15: the rank of a latest value tied across
rollup rows, bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import statistics
import tempfile
import time
from pathlib import Path

from bench import generate as g
from usagemeter.model import Account, Event
from usagemeter.store import sqlite as sqlite_module
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.timewindows import Granularity, bucket_edges, parse_zone

ANCHOR = dt.date(2026, 12, 5)


def events(n: int) -> list[Event]:
    ev = g.all_events(1, n)
    start_ms = g.window_start_ms(ANCHOR)
    return [
        Event(
            f"e{ev.first + i}",
            g.account_id(int(ev.account[i])),
            g.METRICS[int(ev.metric[i])],
            start_ms + int(ev.ts[i]),
            float(ev.value[i]),
            bool(ev.billable[i]),
            None,
            g.dimensions(int(ev.metric[i]), int(ev.account[i]), int(ev.dim[i]), int(ev.dim2[i])),
            frozenset(g.tag_names(int(ev.tags[i]))),
        )
        for i in range(len(ev))
    ]


def questions() -> dict[str, AggregateSpec]:
    zone = parse_zone("America/New_York")
    end = dt.datetime(ANCHOR.year, ANCHOR.month, ANCHOR.day, tzinfo=zone).astimezone(dt.UTC)
    _, edges = bucket_edges(end - dt.timedelta(days=90), end, Granularity.DAY, zone)
    windows = tuple(Window(i, lo, hi) for i, (lo, hi) in enumerate(itertools.pairwise(edges)))
    heavy, latest = (g.account_id(0),), (Measure("latest"),)
    return {
        "StorageBytes latest": AggregateSpec(heavy, "StorageBytes", windows, latest),
        "with totals": AggregateSpec(heavy, "StorageBytes", windows, latest, totals=True),
        "requests by status": AggregateSpec(
            heavy, "requests", windows, latest, ("status",), totals=True
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.latest_ties", description=__doc__)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=40)
    args = p.parse_args()
    sqlite_module.FOLD_EVENTS = 10**12  # one fold, timed, of everything
    sqlite_module.IDLE_FOLD_SECONDS = 10.0**6
    with tempfile.TemporaryDirectory(prefix="latest-ties-") as root:
        store = sqlite_module.SQLiteStore(Path(root) / "usage.db")
        stored = events(args.events)
        for account in sorted({e.account_id for e in stored}):
            store.create_account(Account(account, account))
        for i in range(0, len(stored), 1000):
            store.append(stored[i : i + 1000])
        cpu = time.process_time()
        store.fold()
        print(f"fold CPU {time.process_time() - cpu:.3f} s")
        for level in ("both levels", "merged"):
            if level == "merged":
                wall = time.perf_counter()
                store.merge()
                print(f"merge {time.perf_counter() - wall:.3f} s")
            for name, spec in questions().items():
                store.aggregate(spec)
                took = []
                for _ in range(args.runs):
                    wall = time.perf_counter()
                    store.aggregate(spec)
                    took.append(time.perf_counter() - wall)
                print(f"{level}, {name}: {statistics.median(took) * 1000:.3f} ms")
        store.close()


if __name__ == "__main__":
    main()
