"""Where one question's time goes on a chDB store: the bench's events loaded (bench/chstore.py),
then the question asked ``--runs`` times, each step timed in turn (ClickHouse's query, the
rows' decoding, the engine, ``query_json``, JSON encoding, the collector), and the whole under
cProfile, its top functions printed. What exists once the events are loaded is frozen
(gc.freeze), as the server freezes what its startup built; one step runs unfrozen.

    python -m bench.profile_chquery --events 300000 [--question hourly] [--runs 20] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from bench.chstore import load, questions
from usagemeter.api.native import query_json
from usagemeter.engine import Engine
from usagemeter.store import chplan, open_store
from usagemeter.store.chplan import plan_aggregate
from usagemeter.store.clickhouse import ClickHouseStore

SHORT = {
    "daily": "90-day daily requests",
    "sessions": "90-day daily Sessions (distinct)",
    "hourly": "90-day hourly requests by status, New York",
    "tagged": "90-day daily requests tagged prod",
    "latest": "90-day daily StorageBytes (latest)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_chquery", description=__doc__)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--question", choices=sorted(SHORT), default="hourly")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="usagemeter-profile-"))
    try:
        store = open_store(f"chdb:///{scratch}/chdb")
        assert isinstance(store, ClickHouseStore)
        load(store, args.events)
        query = questions()[SHORT[args.question]]
        engine = Engine(store)
        engine.run(query)  # warm
        # As the server does once started (api/app.py): what exists now lives on, frozen.
        gc.collect()
        gc.freeze()
        spec: list[Any] = []
        aggregate = store.aggregate

        def keep_spec(s: Any) -> Any:
            spec[:] = [s]
            return aggregate(s)

        store.aggregate = keep_spec  # type: ignore[method-assign]
        engine.run(query)
        store.aggregate = aggregate  # type: ignore[method-assign]
        (plan,) = plan_aggregate(spec[0], hour_sets=store.hour_sets.ready())
        (slots_plan,) = plan_aggregate(spec[0], hour_sets=False)
        by_unit = chplan._unit_offset
        chplan._unit_offset = lambda pieces: None  # type: ignore[assignment]
        (joined_plan,) = plan_aggregate(spec[0], hour_sets=store.hour_sets.ready())
        chplan._unit_offset = by_unit  # type: ignore[assignment]

        def unfrozen() -> object:
            gc.unfreeze()
            try:
                return engine.run(query)
            finally:
                gc.freeze()

        def without_collector() -> object:
            gc.disable()
            try:
                return engine.run(query)
            finally:
                gc.enable()

        steps: dict[str, Callable[[], object]] = {
            "ClickHouse's query": lambda: store.transport.query(plan.sql),
            "the same, windows joined (ASOF) rather than by unit": lambda: store.transport.query(
                joined_plan.sql
            ),
            "the same, slots rather than the hour table": lambda: store.transport.query(
                slots_plan.sql
            ),
            "store.aggregate (query and decoding)": lambda: store.aggregate(spec[0]),
            "Engine.run": lambda: engine.run(query),
            "Engine.run, startup not frozen": unfrozen,
            "Engine.run, the collector off": without_collector,
            "Engine.run and query_json": lambda: query_json(engine.run(query)),
            "the same, JSON encoded": lambda: msgspec.json.encode(query_json(engine.run(query))),
        }
        spent: dict[str, list[float]] = {name: [] for name in steps}
        collected: list[float] = []
        for _ in range(args.runs):
            for name, step in steps.items():
                began = time.perf_counter()
                step()
                spent[name].append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            gc.unfreeze()
            gc.collect()
            collected.append((time.perf_counter() - began) * 1000)
            gc.freeze()
        rows = len(store.transport.query(plan.sql))
        print(f"{args.events:,} events, {SHORT[args.question]}: {rows:,} rows from the store\n")
        for name, ms in spent.items():
            print(f"- {name}: median {statistics.median(ms):.1f} ms")
        gc_ms = statistics.median(collected)
        print(f"- a full gc.collect() of everything, after each round: median {gc_ms:.1f} ms")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.runs):
            msgspec.json.encode(query_json(engine.run(query)))
        profile.disable()
        print()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
        store.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
