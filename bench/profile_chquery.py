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
from usagemeter.model import Result
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


def encode(result: Result) -> bytes:
    return msgspec.json.encode(query_json(result))


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
        regular = chplan._regular
        chplan._regular = lambda pieces: None  # type: ignore[assignment]
        (joined_plan,) = plan_aggregate(spec[0], hour_sets=store.hour_sets.ready())
        chplan._regular = regular  # type: ignore[assignment]

        def without_collector() -> object:
            gc.disable()
            try:
                return engine.run(query)
            finally:
                gc.enable()

        steps: dict[str, Callable[[], object]] = {
            "ClickHouse's query": lambda: store.transport.query(plan.sql),
            "the same, windows joined (ASOF)": lambda: store.transport.query(joined_plan.sql),
            "the same, slots rather than the hour table": lambda: store.transport.query(
                slots_plan.sql
            ),
            "store.aggregate (query and decoding)": lambda: store.aggregate(spec[0]),
            "Engine.run, the collector off": without_collector,
        }
        spent: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.runs):
            for name, step in steps.items():
                began = time.perf_counter()
                step()
                spent[name].append((time.perf_counter() - began) * 1000)
        rows = len(store.transport.query(plan.sql))
        print(f"{args.events:,} events, {SHORT[args.question]}: {rows:,} rows from the store\n")
        for name, ms in spent.items():
            print(f"- {name}: median {statistics.median(ms):.1f} ms")
        # A full collection runs every other time or so: the collector's own time per run
        # (gc.callbacks), over runs in a row, with what startup built walked by every full
        # pass, and frozen as the server has it (api/app.py); twice each, in turn.
        collector: list[float] = []
        began_at: list[float] = [0.0]

        def watch(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                began_at[0] = time.perf_counter()
            else:
                collector.append((time.perf_counter() - began_at[0]) * 1000)

        gc.callbacks.append(watch)
        whole: dict[str, list[float]] = {}
        for frozen in (False, True, False, True):
            (gc.freeze if frozen else gc.unfreeze)()
            label = "frozen, as the server has it" if frozen else "not frozen"
            for _ in range(args.runs):
                collector.clear()
                began = time.perf_counter()
                engine.run(query)
                whole.setdefault(f"Engine.run, startup {label}", []).append(
                    (time.perf_counter() - began) * 1000
                )
                whole.setdefault(f"its collector, startup {label}", []).append(sum(collector))
        gc.callbacks.remove(watch)
        for name, ms in whole.items():
            mean, median = statistics.mean(ms), statistics.median(ms)
            print(f"- {name}: mean {mean:.1f} ms, median {median:.1f} ms")
        gc.unfreeze()
        began = time.perf_counter()
        gc.collect()
        print(f"- one full collection of everything: {(time.perf_counter() - began) * 1000:.1f} ms")
        gc.freeze()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.runs):
            encode(engine.run(query))
        profile.disable()
        print()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
        store.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
