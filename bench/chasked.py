"""The hourly report's steps as this checkout's own store and engine run them, asked afresh
and asked again (round 14): run it with each version's sources first on the path, in turn
(A, B, A, B), for a comparison where each version keeps what it keeps, its plans included.

    PYTHONPATH=<checkout>/src:<this checkout> python -m bench.chasked --dir DIR [--cpu]
        [--minutes 7]

DIR is a settled chDB store loaded by bench.profile_chquery (a copy: opening it with newer
code may alter its views). Steps, each run in an order of its own, medians in ms: the
range's cuts made (``cuts``), the question planned (``plan``), the store's answer with its
plan kept (``store``), the engine over a kept answer (``engine alone``), Engine.run with
nothing kept (``afresh``: a range asked the first time) and with both kept (``again``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from bench.chstore import questions
from bench.stored_answer import StoredAnswer
from usagemeter import engine as engine_module
from usagemeter.bulk import collector_paused
from usagemeter.engine import Engine
from usagemeter.store import open_store
from usagemeter.store.clickhouse import ClickHouseStore

HOURLY = "90-day hourly requests by status, New York"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chasked", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--cpu", action="store_true", help="CPU time rather than wall time")
    parser.add_argument(
        "--minutes",
        type=int,
        default=0,
        help="the range moved by this many minutes: a dashboard's, starting and ending inside"
        " an hour",
    )
    args = parser.parse_args(argv)
    clock = time.process_time if args.cpu else time.perf_counter
    store = open_store(f"chdb:///{args.dir}/chdb")
    assert isinstance(store, ClickHouseStore)
    query = questions()[HOURLY]
    moved = timedelta(minutes=args.minutes)
    query = replace(query, start=query.start + moved, end=query.end + moved)
    engine = Engine(store)
    engine.run(query)  # warm
    windows = Engine._edges(query)[2]
    spec = Engine._spec(query, windows, engine.plan(query).measures, query.group_by)
    kept = StoredAnswer(store.aggregate_columns(spec))

    def cuts() -> object:
        engine_module._kept_cuts.cache_clear()
        return Engine._edges(query)

    def plan() -> object:
        store._plans.clear()
        return store.plans(spec)

    def afresh() -> object:
        engine_module._kept_cuts.cache_clear()
        store._plans.clear()
        return engine.run(query)

    steps: dict[str, Callable[[], object]] = {
        "cuts": cuts,
        "plan": plan,
        "store": lambda: store.aggregate_columns(spec),
        "engine alone": lambda: Engine(kept).run(query),
        "afresh": afresh,
        "again": lambda: engine.run(query),
    }
    spent: dict[str, list[float]] = {name: [] for name in steps}
    for n in range(args.runs):
        order = list(steps)
        random.Random(n).shuffle(order)
        for name in order:
            with collector_paused():  # as Engine.run has it, for every step alike
                began = clock()
                steps[name]()
                spent[name].append((clock() - began) * 1000)
    print(" ".join(f"{name}: {statistics.median(ms):.2f} ms" for name, ms in spent.items()))
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
