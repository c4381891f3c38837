"""What a void costs, on each store, beside what a query of the same day costs there; and,
on ClickHouse, the lightweight delete the store uses beside an ALTER TABLE ... DELETE
mutation (mutations_sync = 2), in the same run.

    python -m bench.corrections [--events 50000] [--runs 5] [--stores sqlite,chdb,postgres]

One account holds ``--events`` events over 30 days (about 1,700 a day, 60 dimension values).
Each run voids 10 events by id on one day, voids one hour of the metric by filter, and
amends one event; then asks for that day in hours. Figures are medians in milliseconds, in
this process (no HTTP). PostgreSQL needs --postgres URL (an empty database).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from usagemeter.corrections import Amendment, VoidSelector
from usagemeter.model import Account, Event
from usagemeter.store import chvoids, open_store
from usagemeter.store.base import AggregateSpec, Measure, Store, Window
from usagemeter.store.chtransport import Transport

BASE_MS = 1_735_689_600_000  # 2025-01-01
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
DAYS = 30


def load(store: Store, count: int) -> list[Event]:
    rng = random.Random(18)
    store.create_account(Account("acme", "Acme"))
    events = [
        Event(
            f"e{i}",
            "acme",
            "m",
            BASE_MS + rng.randrange(DAYS * DAY_MS),
            float(rng.randrange(100)),
            dimensions={"agent": f"a{rng.randrange(60)}"},
        )
        for i in range(count)
    ]
    for i in range(0, count, 10_000):
        store.append(events[i : i + 10_000])
    return events


def timed(work: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    work(*args)
    return (time.perf_counter() - start) * 1000


def run(store: Store, events: list[Event], runs: int) -> dict[str, float]:
    taken: dict[str, list[float]] = {"void 10 ids": [], "void 1 hour": [], "amend": [], "query": []}
    for r in range(runs):
        day = BASE_MS + (r + 1) * DAY_MS
        on_day = [e.id for e in events if day <= e.ts_ms < day + DAY_MS]
        ids = VoidSelector("acme", ids=tuple(on_day[:10]))
        taken["void 10 ids"].append(timed(store.void_events, ids, "b", None, 0))
        hour = VoidSelector("acme", metric="m", start_ms=day + HOUR_MS, end_ms=day + 2 * HOUR_MS)
        taken["void 1 hour"].append(timed(store.void_events, hour, "b", None, 0))
        target = VoidSelector("acme", ids=(on_day[-1],))
        taken["amend"].append(timed(store.void_events, target, "b", None, 0, Amendment(1.0)))
        windows = tuple(Window(h, day + h * HOUR_MS, day + (h + 1) * HOUR_MS) for h in range(24))
        spec = AggregateSpec(("acme",), "m", windows, (Measure("sum"), Measure("max")))
        taken["query"].append(timed(store.aggregate, spec))
    return {name: statistics.median(values) for name, values in taken.items()}


def _mutation(transport: Transport, table: str, where: str) -> None:
    transport.command(f"ALTER TABLE {table} DELETE WHERE {where} SETTINGS mutations_sync = 2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stores", default="sqlite,chdb")
    parser.add_argument("--postgres", help="postgresql:// URL of an empty database")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-corrections-"))
    results: dict[str, dict[str, float]] = {}
    try:
        for kind in args.stores.split(","):
            variants = [("lightweight", chvoids.delete_rows), ("mutation", _mutation)]
            for variant, delete in variants if kind == "chdb" else [("", chvoids.delete_rows)]:
                chvoids.delete_rows = delete  # type: ignore[assignment]
                name = f"{kind} {variant}".strip()
                if kind == "sqlite":
                    url = f"sqlite:///{home}/{variant or 'u'}.db"
                elif kind == "chdb":
                    url = f"chdb:///{home}/ch_{variant}"
                else:
                    url = args.postgres
                store = open_store(url)
                try:
                    events = load(store, args.events)
                    results[name] = run(store, events, args.runs)
                finally:
                    store.close()
    finally:
        chvoids.delete_rows = variants[0][1]  # type: ignore[assignment]
        shutil.rmtree(home, ignore_errors=True)
    columns = list(next(iter(results.values())))
    print(f"{args.events:,} events; medians of {args.runs} runs, ms")
    print("| store | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
