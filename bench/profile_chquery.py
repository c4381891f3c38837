"""Where each question's time goes on a chDB store: the bench's events loaded (bench/chstore.py),
then first every question split in three, each part timed in turn with the whole: ClickHouse
executing the statement and writing its result (the raw bytes), reading that result (the JSON
decoded by columns into the store's answer), and our Python (the rest of Engine.run: windows,
planning, cells, totals); beside it the raw chDB peer's statement. Then one question asked
``--runs`` times, each step timed in turn (ClickHouse's query, the answer's decoding, the
engine, the collector), and the whole under cProfile, its top functions printed. What exists
once the events are loaded is frozen (gc.freeze), as the server freezes what its startup
built; one step runs unfrozen.

    python -m bench.profile_chquery --events 300000 [--question hourly] [--runs 20] [--top 25]
                                    [--dir DIR]

``--dir`` keeps the chDB files there and, when it already holds the events, reads them
rather than loading them again. ``--against SRC`` (another version's ``src/usagemeter``, main's
say) first asks every question of that version's engine and ClickHouse planner (with the
tables it knows of, its answer read as it read it) and of this one, in turn with the peer,
answers checked equal, after the two engines alone over each question's stored answer (no
database, in turn); ``--sqlite`` adds the two engines over a SQLite store of the same events.
``--cpu`` times the comparisons and the breakdown in the process's CPU time (chDB's threads
included) rather than the wall clock: on a shared machine, the steadier measure of a change.
``--prototype`` builds, in a scratch database of the same session, tables the schema does not
have (distinct-count states per hour and dimension; the latest value as a plain tuple maximum
per day; the day table's argMax states in small granules), fills them from the store's events
as views would, and asks the distinct and latest questions of them beside the store's own
statements and the peer's, in turn, answers checked equal. (Round 8 built the first two as
the schema's ``distinct_hour`` and ``latest_hour``: "the store's" column is its plan without
them, as before round 8.) Round 9 adds distinct-count states per UTC day (``distinct_day``),
and the hour's distinct values as arrays of their hashes (``distinct_hashes``), each asked
beside the store's plan as it is; ``--prototype distinct_day`` builds only that one.
``--merged [TABLE ...]`` (round 10) copies the store, part for part, into a second database
of the same session, merges the named rollups there (every one when none is named) into one
part per partition, as ``OPTIMIZE ... FINAL`` or a table's settling leaves them, and asks
every question of both stores in turn with the peer, answers checked equal: what a table's
parts cost its questions, the rows of each as many as the load left. ``--final`` (round 14,
its variants round 16's second step's since) asks only the Sessions statement, its merges
stopped, beside variants of its streams and its parts, and a probe of the second core
(``--against`` adds that version's statement);
``--tail N`` first appends a live tail of N of the heavy account's Sessions in one insert,
merges stopped, so that the distinct values hold a small part beside the settled one.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import inspect
import math
import pstats
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import msgspec

from bench.chstore import ANCHOR, Peer, load, peer_question, questions
from bench.peers import chdb_peer
from bench.stored_answer import StoredAnswer
from usagemeter import engine as engine_module
from usagemeter.api.native import query_answer
from usagemeter.engine import Engine
from usagemeter.model import Event, Query, Result
from usagemeter.store import chplan, open_store
from usagemeter.store.base import AggregateColumns, AggregateSpec, Store
from usagemeter.store.chplan import SetsPlan, decode_columns, decode_sets, plan_aggregate
from usagemeter.store.chsettle import VALUES_PARTS_S
from usagemeter.store.chtransport import ChdbTransport, _columns
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlplan import run_plans

# What the in-turn comparisons and the breakdown time: the wall clock, or with --cpu the
# process's CPU time (every thread's, chDB's included), which a shared machine's load moves
# far less: other processes' work is not counted, only what it costs ours in caches.
CLOCK: list[Callable[[], float]] = [time.perf_counter]

SHORT = {
    "daily": "90-day daily requests",
    "sessions": "90-day daily Sessions (distinct)",
    "hourly": "90-day hourly requests by status, New York",
    "tagged": "90-day daily requests tagged prod",
    "latest": "90-day daily StorageBytes (latest)",
}


def encode(result: Result) -> bytes:
    """The native response's bytes for ``result``, as the API writes them."""
    return msgspec.json.encode(query_answer(result))


def asked(store: ClickHouseStore, query: Query) -> AggregateSpec:
    """The spec the engine asks the store for ``query``."""
    spec: list[AggregateSpec] = []
    aggregate = store.aggregate_columns

    def keep_spec(s: AggregateSpec) -> Any:
        spec[:] = [s]
        return aggregate(s)

    store.aggregate_columns = keep_spec  # type: ignore[method-assign]
    try:
        Engine(store).run(query)
    finally:
        store.aggregate_columns = aggregate  # type: ignore[method-assign]
    return spec[0]


def breakdown(store: ClickHouseStore, peer: ChdbTransport, runs: int) -> None:
    """Each question's Engine.run split into ClickHouse, reading its result, and Python; the
    parts and the whole timed in turn (medians), beside the peer's statement."""
    print("| question | Engine.run | ClickHouse | reading | Python | peer |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, query in questions().items():
        ms = _split(store, peer, label, query, runs)
        python = ms["whole"] - ms["clickhouse"] - ms["reading"]
        cells = [ms["whole"], ms["clickhouse"], ms["reading"], python, ms["peer"]]
        print(f"| {label} | " + " | ".join(f"{v:.1f} ms" for v in cells) + " |")
    print()


def _split(
    store: ClickHouseStore, peer: ChdbTransport, label: str, query: Query, runs: int
) -> dict[str, float]:
    assert isinstance(store.transport, ChdbTransport)
    transport = store.transport
    spec = asked(store, query)
    plans = store.plans(spec)
    settings = " SETTINGS output_format_json_quote_64bit_integers = 0"
    peer_sql = chdb_peer.sql(peer_question(label, query))

    def clickhouse() -> list[bytes]:
        return [transport._run(p.sql + settings, "JSONCompactColumns").bytes() for p in plans]

    answers = clickhouse()

    def reading() -> object:
        if len(plans) > 1:  # several statements: merged by rows, counted as Python
            return [_columns(a) for a in answers]
        if isinstance(plans[0], SetsPlan):  # by set, each set's dimensions kept (round 13)
            return decode_sets(spec, plans[0], _columns(answers[0]), store._sets, store._tagsets)
        return decode_columns(spec, plans[0], _columns(answers[0]))

    steps: dict[str, Callable[[], object]] = {
        "whole": lambda: Engine(store).run(query),
        "clickhouse": clickhouse,
        "reading": reading,
        "peer": lambda: peer.query(peer_sql),
    }
    spent: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            began = CLOCK[0]()
            step()
            spent[name].append((CLOCK[0]() - began) * 1000)
    return {name: statistics.median(v) for name, v in spent.items()}


def _module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _theirs(source: Path, name: str, path: str) -> Any:
    """``source``'s module at ``path`` (engine.py, api/native.py), made with ``source``'s own
    ``Result`` and the columns it holds (round 12 keeps an answer's cells as columns, an
    older Result holds its buckets) and this version's every other type (its queries, its
    stores' answers); the answers compare as plain tuples (``_plain``)."""
    ours = sys.modules["usagemeter.model"]
    theirs = _module("against_model", source / "model.py")
    shim = types.ModuleType("usagemeter.model")
    shim.__dict__.update(ours.__dict__)
    for name in ("Result", "BucketCells", "NO_CELLS"):  # an answer's types as it made them
        if hasattr(theirs, name):
            setattr(shim, name, getattr(theirs, name))
    sys.modules["usagemeter.model"] = shim
    try:
        return _module(name, source / path)
    finally:
        sys.modules["usagemeter.model"] = ours


class _Planned:
    """The store's answers as another version's ClickHouse planner asks for them: with the
    tables that version knows of (the flags its plan_aggregate takes), read by columns when
    it can (its decode_columns), else row by row, as that version's store did; a plan by
    set (round 13) read by that version's store's own _by_sets, with sets of its own kept."""

    def __init__(self, store: ClickHouseStore, planner: Any, reader: Any = None) -> None:
        self.store, self.planner = store, planner
        known = inspect.signature(planner.plan_aggregate).parameters
        ready = {
            "hour_sets": store.hour_sets.ready(),
            # A database made before round 14 has the distinct states per hour: a new one not.
            "distinct_hours": store.distinct_hours is not None and store.distinct_hours.ready(),
            "latest_hours": store.latest_hours.ready(),
            "distinct_values": store.distinct_values.ready(),
            # The distinct values taken as in parts (--written), as this version's store has it.
            "values_parts": time.monotonic() - store.values_written < VALUES_PARTS_S,
        }
        self.flags = {name: value for name, value in ready.items() if name in known}
        # What that version's _by_sets reads of its store: the transport, the sets it kept.
        self.transport = store.transport
        self._sets: dict[int, Any] = {}
        self._tagsets: dict[int, Any] = {}
        self._by_value: set[Any] = set()
        self.reader = reader

    def raw_horizon(self) -> int | None:
        return self.store.raw_horizon()

    def aggregate_columns(self, spec: AggregateSpec) -> AggregateColumns:
        if not spec.windows:
            return AggregateColumns([], [], [])
        plans = self.planner.plan_aggregate(spec, **self.flags)
        transport = self.store.transport
        if len(plans) == 1 and hasattr(self.planner, "decode_columns"):
            (plan,) = plans
            if hasattr(plan, "lookup"):  # by set: as that version's store reads it
                return cast(AggregateColumns, self.reader._by_sets(self, spec, plan))
            return cast(
                AggregateColumns,
                self.planner.decode_columns(spec, plan, transport.query_columns(plan.sql)),
            )
        rows = run_plans(plans, lambda plan: transport.query(plan.sql), len(spec.measures))
        return AggregateColumns.from_rows(rows)

    def _by_values(self, spec: AggregateSpec, plan: Any) -> AggregateColumns:
        answer = self.planner.decode_columns(
            spec, plan, self.transport.query_columns(plan.by_value)
        )
        return cast(AggregateColumns, answer)

    def _members(self, *args: Any) -> Any:
        return self.reader._members(self, *args)


def _their_store(source: Path, planner: Any) -> Any:
    """``source``'s ClickHouseStore class, its module made with ``source``'s planner (its
    chplan.py) in place of this one's, for its _by_sets; None before round 13 (no sets)."""
    if not hasattr(planner, "SetsPlan"):
        return None
    ours = sys.modules["usagemeter.store.chplan"]
    sys.modules["usagemeter.store.chplan"] = planner
    try:
        return _module("against_clickhouse", source / "store" / "clickhouse.py").ClickHouseStore
    finally:
        sys.modules["usagemeter.store.chplan"] = ours


def against(
    source: Path, store: ClickHouseStore, peer: ChdbTransport, sqlite: Store | None, runs: int
) -> None:
    """Every question asked of ``source``'s engine and planner and of this version's, in
    turn (each run starting with the next of them), beside the peer; medians. Each is timed
    twice: Engine.run alone, and answered (Engine.run and the native response's bytes, as
    each version's API writes them: ``source``'s query_json encoded, this one's
    query_answer), the bytes checked equal."""
    other = _theirs(source, "against_engine", "engine.py")
    rendering = _theirs(source, "against_native", "api/native.py")
    planner = _module("against_chplan", source / "store" / "chplan.py")
    planned = _Planned(store, planner, _their_store(source, planner))
    rows = []
    for label, query in questions().items():
        peer_sql = chdb_peer.sql(peer_question(label, query))
        before = _response(rendering, other.Engine(planned).run(query))
        if before != encode(Engine(store).run(query)):
            raise SystemExit(f"{label}: the versions' responses differ")
        ms = _in_turn(
            {
                "before": lambda q=query: other.Engine(planned).run(q),
                "after": lambda q=query: Engine(store).run(q),
                "after, afresh": lambda q=query: _afresh(store, q),
                "before, afresh": lambda q=query: _their_afresh(other, planned, q),
                "before, answered": lambda q=query: _response(
                    rendering, other.Engine(planned).run(q)
                ),
                "after, answered": lambda q=query: encode(Engine(store).run(q)),
                "peer": lambda s=peer_sql: peer.query(s),
            },
            runs,
        )
        rows.append((label, ms))
    for answered in ("", ", answered"):
        what = "Engine.run and the response" if answered else "Engine.run"
        print(
            f"| {what}, heavy account, 90 days | before | this version | raw chDB peer |"
            " ratio | to peer |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for label, ms in rows:
            b, a = ms["before" + answered], ms["after" + answered]
            cells = [f"{b:.1f} ms", f"{a:.1f} ms", f"{ms['peer']:.1f} ms"]
            cells += [f"{b / a:.2f}", f"{a / ms['peer']:.2f}"]
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()
    # "before" plans each question again (_Planned keeps no statements) but may keep its
    # range's cuts (round 14); "before, afresh" keeps neither, as a range asked the first time.
    print(
        "| Engine.run, range and plan not kept | before | before, afresh | this version, afresh"
        " | ratio to before, afresh |"
    )
    print("|---|---:|---:|---:|---:|")
    for label, ms in rows:
        b, bf, a = ms["before"], ms["before, afresh"], ms["after, afresh"]
        print(f"| {label} | {b:.1f} ms | {bf:.1f} ms | {a:.1f} ms | {bf / a:.2f} |")
    print()
    if sqlite is not None:
        print("\n| SQLite, heavy account, 90 days | before | this version | ratio |")
        print("|---|---:|---:|---:|")
        for label, query in questions().items():
            ms = _in_turn(
                {
                    "before": lambda q=query: other.Engine(sqlite).run(q),
                    "after": lambda q=query: Engine(sqlite).run(q),
                },
                runs,
            )
            ratio = ms["before"] / ms["after"]
            print(f"| {label} | {ms['before']:.1f} ms | {ms['after']:.1f} ms | {ratio:.2f} |")
    print()


def _afresh(store: ClickHouseStore, query: Query) -> Result:
    """Engine.run with nothing kept from an earlier asking (round 14): the range's cuts and
    windows made again (engine._kept_cuts), the question planned again (store._plans), as
    for a range asked the first time."""
    engine_module._kept_cuts.cache_clear()
    store._plans.clear()
    return Engine(store).run(query)


def _their_afresh(other: Any, planned: _Planned, query: Query) -> Any:
    """``other``'s Engine.run with its range's cuts made again, where it keeps them (round
    14); _Planned plans every question again anyway: a range asked the first time."""
    kept = getattr(other, "_kept_cuts", None)
    if kept is not None:
        kept.cache_clear()
    return other.Engine(planned).run(query)


def engines(source: Path, store: ClickHouseStore, runs: int) -> None:
    """Each question's answer from the store, kept, then ``source``'s engine and this one
    over it in turn (answers checked equal): the Python every store's questions share; then
    the same with the native response's bytes written, as each version's API writes them."""
    other = _theirs(source, "against_engine_alone", "engine.py")
    rendering = _theirs(source, "against_native_alone", "api/native.py")
    print(
        "| the engine alone, heavy account, 90 days | cells | before | this version | ratio |"
        " answered, before | this version | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, query in questions().items():
        stored = StoredAnswer(store.aggregate_columns(asked(store, query)))
        ms = _in_turn(
            {
                "before": lambda q=query, s=stored: other.Engine(s).run(q),
                "after": lambda q=query, s=stored: Engine(s).run(q),
                "before, answered": lambda q=query, s=stored: _response(
                    rendering, other.Engine(s).run(q)
                ),
                "after, answered": lambda q=query, s=stored: encode(Engine(s).run(q)),
            },
            runs,
        )
        cells = [f"{len(stored.answer.windows):,}"]
        for answered in ("", ", answered"):
            b, a = ms["before" + answered], ms["after" + answered]
            cells += [f"{b:.2f} ms", f"{a:.2f} ms", f"{b / a:.2f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()


def _response(rendering: Any, result: Any) -> bytes:
    """``result``'s response as the version of ``rendering`` (its api/native.py) writes it:
    query_answer where it has one (round 12), else query_json's dicts."""
    if hasattr(rendering, "query_answer"):
        return msgspec.json.encode(rendering.query_answer(result))
    return msgspec.json.encode(rendering.query_json(result))


def _plain(result: Any) -> tuple[object, ...]:
    """An answer's buckets, groups' values and totals as plain tuples: two versions' answers
    compare whatever classes each version's model made them of."""
    buckets = [(b.start, b.end, [(g.group, g.values) for g in b.groups]) for b in result.buckets]
    return buckets, [(g.group, g.values) for g in result.totals], result.total


def _in_turn(steps: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median milliseconds of each step, each run in an order of its own (shuffled, seeded by
    the run); the answers of the steps that return a Result (either version's) checked
    equal, and those that return a response's bytes. A rotation (each run starting with the
    next step) kept each step behind the same one: the first always behind the peer's
    statement, which made the same code's Engine.run 1.05 to 1.35 times as slow there
    (round 13)."""
    made = [step() for step in steps.values()]
    answers = [_plain(a) for a in made if hasattr(a, "totals")]
    written = [a for a in made if isinstance(a, bytes)]
    if any(a != answers[0] for a in answers) or any(w != written[0] for w in written):
        raise SystemExit("the versions' answers differ")
    names = list(steps)
    spent: dict[str, list[float]] = {name: [] for name in names}
    for n in range(runs):
        order = names[:]
        random.Random(n).shuffle(order)
        for name in order:
            began = CLOCK[0]()
            steps[name]()
            spent[name].append((CLOCK[0]() - began) * 1000)
    return {name: statistics.median(v) for name, v in spent.items()}


PROTO = "proto_r7"
# Tables a later schema could add, filled from the store's events in ten inserts (ten parts,
# as a store's tables hold several between merges).
PROTO_TABLES = {
    # Distinct-count states per UTC hour and dimension: a day's distinct sessions merge 24
    # states rather than hashing every event's value out of its map of plain strings.
    "distinct_hour": (
        "account String, metric LowCardinality(String), name LowCardinality(String),"
        " slot Int64, billable UInt8, u AggregateFunction(uniqExact, String)",
        "(account, metric, name, slot, billable)",
        "SELECT account, metric, name, intDiv(ts, 3600000) AS slot, billable,"
        " uniqExactState(v) AS u FROM {db}.events ARRAY JOIN mapKeys(dims) AS name,"
        " mapValues(dims) AS v WHERE {rows} GROUP BY account, metric, name, slot, billable",
    ),
    # The latest value as the maximum of (ts, seq, value): a plain tuple column, read like a
    # sum, where an argMax state is parsed row by row across every granule read.
    "latest_day": (
        "account String, metric LowCardinality(String), slot Int64, billable UInt8,"
        " last SimpleAggregateFunction(max, Tuple(Int64, UInt64, Float64))",
        "(account, metric, slot, billable)",
        "SELECT account, metric, intDiv(ts, 86400000) AS slot, billable,"
        " max((ts, seq, value)) AS last FROM {db}.events WHERE {rows}"
        " GROUP BY account, metric, slot, billable",
    ),
    # Round 9: distinct-count states per UTC day, as distinct_hour keeps them per hour (its
    # '' rows included): a daily report in UTC merges a state per day rather than 24.
    "distinct_day": (
        "account String, metric LowCardinality(String), name LowCardinality(String),"
        " slot Int64, billable UInt8, u AggregateFunction(uniqExact, String)",
        "(account, metric, name, slot, billable)",
        "SELECT account, metric, name, intDiv(ts, 86400000) AS slot, billable,"
        " uniqExactStateIf(v, name != '') AS u FROM {db}.events"
        " ARRAY JOIN arrayConcat([''], mapKeys(dims)) AS name,"
        " arrayConcat([''], mapValues(dims)) AS v WHERE {rows}"
        " GROUP BY account, metric, name, slot, billable",
    ),
    # Round 9: the hour's distinct values as an array of their 128-bit hashes (the SipHash
    # uniqExact keeps of a string), '' rows included: a count is uniqExact over the arrays
    # joined out, so no state per hour is rebuilt as a hash set before it is merged.
    "distinct_hashes": (
        "account String, metric LowCardinality(String), name LowCardinality(String),"
        " slot Int64, billable UInt8,"
        " hs SimpleAggregateFunction(groupUniqArrayArray, Array(UInt128))",
        "(account, metric, name, slot, billable)",
        "SELECT account, metric, name, intDiv(ts, 3600000) AS slot, billable,"
        " groupUniqArrayIf(reinterpretAsUInt128(sipHash128(v)), name != '') AS hs"
        " FROM {db}.events ARRAY JOIN arrayConcat([''], mapKeys(dims)) AS name,"
        " arrayConcat([''], mapValues(dims)) AS v WHERE {rows}"
        " GROUP BY account, metric, name, slot, billable",
    ),
    # rollup_day's argMax states as they are, in granules of 256 rows rather than 8,192.
    "rollup_day_g256": (
        "account String, metric LowCardinality(String), slot Int64, billable UInt8,"
        " last AggregateFunction(argMax, Float64, Tuple(Int64, UInt64))",
        "(account, metric, slot, billable) SETTINGS index_granularity = 256",
        "SELECT account, metric, intDiv(ts, 86400000) AS slot, billable,"
        " argMaxState(value, (ts, seq)) AS last FROM {db}.events WHERE {rows}"
        " GROUP BY account, metric, slot, billable",
    ),
}


def prototype(
    store: ClickHouseStore, peer: ChdbTransport, runs: int, tables: list[str] | None = None
) -> None:
    """The distinct and latest questions asked of PROTO_TABLES (or those of ``tables``)
    beside the store's statements and the peer's (medians, in turn; each answer checked
    equal to the store's). The store's statement is its plan before round 8's tables, but
    beside distinct_day, its plan now (distinct_hour's states)."""
    assert isinstance(store.transport, ChdbTransport)
    scratch = ChdbTransport(store.transport._shared.path, PROTO)
    db = store.transport.database
    first, top = store.transport.query("SELECT min(seq), max(seq) + 1 FROM events")[0]
    built = {t: PROTO_TABLES[t] for t in tables or PROTO_TABLES}
    for table, (columns, order, fill) in built.items():
        scratch.command(f"DROP TABLE IF EXISTS {table}")
        scratch.command(
            f"CREATE TABLE {table} ({columns}) ENGINE = AggregatingMergeTree ORDER BY {order}"
        )
        scratch.command(f"SYSTEM STOP MERGES {table}")  # ten parts stay ten
        step = -(-(int(top) - int(first)) // 10)
        for lo in range(int(first), int(top), step):
            rows = f"seq >= {lo} AND seq < {lo + step}"
            scratch.command(f"INSERT INTO {table} " + fill.format(db=db, rows=rows))
    parts = scratch.query(
        "SELECT database, table, count() FROM system.parts WHERE active"
        f" AND database IN ({PROTO!r}, {db!r}) GROUP BY database, table ORDER BY 1, 2"
    )
    print("active parts: " + ", ".join(f"{d}.{t} {n}" for d, t, n in parts) + "\n")
    print("| question (statement only) | the store's | prototype | raw chDB peer | store / proto |")
    print("|---|---:|---:|---:|---:|")
    labels = {
        "90-day daily Sessions (distinct)": ("distinct_hour", "uniqExactMerge(u)", 24),
        "90-day daily Sessions (distinct), day states": ("distinct_day", "uniqExactMerge(u)", 1),
        "90-day daily Sessions (distinct), hashes": (
            "distinct_hashes",
            "uniqExactIf(x, name != '')",
            24,
        ),
        "90-day daily StorageBytes (latest)": ("latest_day", "max(last).3", 1),
        "90-day daily StorageBytes (latest), small granules": (
            "rollup_day_g256",
            "argMaxMerge(last)",
            1,
        ),
    }
    for label, (table, value, per_day) in labels.items():
        if table not in built:
            continue
        query = questions()[label.split(", ")[0]]
        spec = asked(store, query)
        if table in ("distinct_day", "distinct_hashes"):
            (plan,) = store.plans(spec)
        else:
            (plan,) = plan_aggregate(spec, hour_sets=store.hour_sets.ready())
        unit = 3_600_000 if per_day == 24 else 86_400_000
        lo, hi = spec.windows[0].start_ms // unit, spec.windows[-1].end_ms // unit
        name = ""
        if table == "distinct_hour":
            name = " AND name = 'session_id'"
        elif table in ("distinct_day", "distinct_hashes"):  # '' rows: events here
            name = " AND name IN ('', 'session_id')"
        # The '' rows' empty arrays still give their row (x 0, not counted): LEFT.
        joined = " LEFT ARRAY JOIN hs AS x" if table == "distinct_hashes" else ""
        sql = (
            f"WITH intDiv(slot - {lo}, {per_day}) AS idx SELECT if(grouping(idx) = 0, idx, -1),"
            f" {value} FROM {table}{joined} WHERE account = 'acct-0'"
            f" AND metric = {spec.metric!r}{name}"
            f" AND slot >= {lo} AND slot < {hi} GROUP BY GROUPING SETS ((idx), ())"
            " HAVING count() > 0 ORDER BY 1"
        )
        ours = sorted(zip(*store.transport.query_columns(plan.sql), strict=True))
        if sorted(zip(*scratch.query_columns(sql), strict=True)) != ours:
            raise SystemExit(f"{label}: the prototype's answer differs from the store's")
        peer_sql = chdb_peer.sql(peer_question(label, query))
        ms = _in_turn(
            {
                "store": lambda s=plan.sql: store.transport.query_columns(s),
                "proto": lambda s=sql: scratch.query_columns(s),
                "peer": lambda s=peer_sql: peer.query(s),
            },
            runs,
        )
        cells = [f"{ms[k]:.1f} ms" for k in ("store", "proto", "peer")]
        print(f"| {label} | " + " | ".join(cells) + f" | {ms['store'] / ms['proto']:.2f} |")
    print()
    scratch.command(f"DROP DATABASE {PROTO}")
    scratch.close()


MERGED = "merged_r10"
# distinct_values rather than distinct_hour since round 14: a new database has no distinct states.
ROLLUPS = ("rollup", "rollup_hour_sets", "hour_values", "distinct_values")


def merged_copy(store: ClickHouseStore, tables: list[str]) -> ClickHouseStore:
    """A store on a copy of ``store``'s database (MERGED, in the same session): each table
    copied part for part (one INSERT per active part, with no merge on insert, so that its
    rows per key are as many as the store's), merges stopped, then ``tables`` merged with
    OPTIMIZE ... FINAL. Opened fresh first, so that every table it backfills is complete
    from the start; its views dropped before the copy, so that nothing is folded twice."""
    assert isinstance(store.transport, ChdbTransport)
    db, path = store.transport.database, store.transport._shared.path
    ChdbTransport(path, MERGED).command(f"DROP DATABASE IF EXISTS {MERGED}")
    copy = ClickHouseStore(ChdbTransport(path, MERGED), str(Path(store.side.path).parent / "m"))
    transport = copy.transport
    for (view,) in transport.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase()"
        " AND engine = 'MaterializedView'"
    ):
        transport.command(f"DROP VIEW {view}")
    for table in ("events", *ROLLUPS):
        transport.command(f"SYSTEM STOP MERGES {table}")
        parts = transport.query(
            f"SELECT name FROM system.parts WHERE database = {db!r} AND table = {table!r}"
            " AND active ORDER BY name"
        )
        for (part,) in parts:
            transport.command(
                f"INSERT INTO {table} SELECT * FROM {db}.{table} WHERE _part = {part!r}"
                " SETTINGS optimize_on_insert = 0, max_insert_block_size = 100000000,"
                " min_insert_block_size_rows = 100000000, max_partitions_per_insert_block = 0"
            )
    for table in tables:
        transport.command(f"SYSTEM START MERGES {table}")
        transport.command(f"OPTIMIZE TABLE {table} FINAL")
    for database in (db, MERGED):
        counts = transport.query(
            "SELECT table, count(), sum(rows) FROM system.parts WHERE active"
            f" AND database = {database!r} AND table IN ({', '.join(map(repr, ROLLUPS))})"
            " GROUP BY table ORDER BY table"
        )
        print(f"{database}: " + ", ".join(f"{t} {n} parts ({r:,} rows)" for t, n, r in counts))
    print()
    return copy


def merged(store: ClickHouseStore, peer: ChdbTransport, runs: int, tables: list[str]) -> None:
    """Every question asked of the store as loaded and of its copy with ``tables`` merged
    (merged_copy), in turn with the peer; medians (CLOCK), answers checked equal."""
    copy = merged_copy(store, tables)
    gc.collect()
    gc.freeze()
    print("| heavy account, 90 days | as loaded | merged | raw chDB peer | ratio | merged / peer |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, query in questions().items():
        peer_sql = chdb_peer.sql(peer_question(label, query))
        ms = _in_turn(
            {
                "loaded": lambda q=query: Engine(store).run(q),
                "merged": lambda q=query: Engine(copy).run(q),
                "peer": lambda s=peer_sql: peer.query(s),
            },
            runs,
        )
        cells = [f"{ms[k]:.1f} ms" for k in ("loaded", "merged", "peer")]
        cells += [f"{ms['loaded'] / ms['merged']:.2f}", f"{ms['merged'] / ms['peer']:.2f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    copy.transport.command(f"DROP DATABASE {MERGED}")
    copy.close()


def stop_merges(store: ClickHouseStore) -> None:
    """No merge in any table of the store from now on in this process: its parts stay as
    found, and no merge's CPU (chDB's threads are the process's) is timed."""
    for (name,) in store.transport.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase()"
        " AND engine LIKE '%MergeTree'"
    ):
        store.transport.command(f"SYSTEM STOP MERGES {name}")


def live_tail(store: ClickHouseStore, events: int) -> None:
    """A live tail (round 14's state, made in this process): ``events`` of the heavy
    account's Sessions in the last 6 hours before the bench's window ends, in one append,
    merges stopped first (stop_merges), so that the values' table holds a small part beside
    the others, each value's in every granule of the big one. Ids of their own each run."""
    stop_merges(store)
    rng, run = random.Random(), time.time_ns()
    end = int(ANCHOR.timestamp() * 1000)
    store.append(
        [
            Event(
                id=f"tail-{run}-{n}",
                account_id="acct-0",
                metric="Sessions",
                ts_ms=end - rng.randrange(6 * 3_600_000),
                dimensions={"session_id": f"sess-{rng.randrange(200_000)}"},
            )
            for n in range(events)
        ]
    )


def final_variants(store: ClickHouseStore, runs: int, source: Path | None = None) -> None:
    """The Sessions statement (one account's distinct values counted as rows, FINAL) on the
    store as it is (a live tail's parts, a backfill's, one part), in turn (CLOCK, medians),
    answers checked equal: as ``source``'s planner (main's, say) plans it and as this one
    does; round 16's second step's variants of its streams (FINAL by one thread, as
    planned, and by two; no FINAL, exact over one part only, by one thread or two; without
    the total, a floor); the statement's parts: the account's rows read plainly, merged by
    key alone (FINAL), with ``hours``, each row's keys (d) made; and whether the process
    has a second core at all (the same sum over numbers_mt by one thread and by two: where
    two take as long as one, no second stream can pay by the wall clock). Merges are
    stopped (main, stop_merges): the parts stay as they are found. Earlier rounds'
    variants are in their versions of this file."""
    assert isinstance(store.transport, ChdbTransport)
    transport, table = store.transport, "distinct_values"
    spec = asked(store, questions()[SHORT["sessions"]])
    (plan,) = store.plans(spec)
    planned = plan.sql
    made = re.search(
        r"WITH (arrayDistinct\(.*\)) AS d, .* ARRAY JOIN (.*) AS idx (?:PREWHERE|WHERE) (.*)"
        r" GROUP BY idx SETTINGS ",
        planned,
    )
    if made is None or f"FROM {table} FINAL " not in planned:
        raise SystemExit("the Sessions statement does not count the values as rows")
    found, _, where = made.groups()
    marker = re.search(r"if\(idx = (\d+), ", planned)
    if marker is None:
        raise SystemExit("the Sessions statement has no total")
    rows = f"FROM {table} FINAL WHERE {where} SETTINGS {chplan.FINAL_SETTINGS}"
    parts = transport.query(
        "SELECT rows FROM system.parts WHERE database = currentDatabase()"
        f" AND table = {table!r} AND active ORDER BY name"
    )
    print(f"{table}: {len(parts)} parts, rows " + ", ".join(f"{int(r):,}" for (r,) in parts))
    print()

    def counted(keys: str, joined: str, count: str, where: str = where) -> str:
        return (
            f"SELECT * FROM (WITH {keys} AS d, toUInt8(name != '') AS h SELECT if(idx ="
            f" {marker[1]}, -1, toInt64(idx)) AS window_index, {count} FROM {table} FINAL"
            f" ARRAY JOIN {joined} AS idx WHERE {where} GROUP BY idx"
            f" SETTINGS {chplan.FINAL_SETTINGS})"
        )

    steps: dict[str, Callable[[], object]] = {}
    if source is not None:
        theirs = _Planned(store, _module("against_chplan", source / "store" / "chplan.py"))
        (before,) = theirs.planner.plan_aggregate(spec, **theirs.flags)
        steps["before (the --against version's plan)"] = lambda: transport.query(before.sql)
    streams = r"SETTINGS max_final_threads = \d+\)$"
    variants = {
        "as planned": planned,
        "one stream: max_final_threads = 1": re.sub(
            streams, f"SETTINGS {chplan.FINAL_SETTINGS})", planned
        ),
        "two streams: max_final_threads = 2": re.sub(
            streams, "SETTINGS max_final_threads = 2)", planned
        ),
        "no FINAL, one stream (exact over one part only)": re.sub(
            streams, "SETTINGS max_threads = 1)", planned.replace(f" {table} FINAL ", f" {table} ")
        ),
        "no FINAL, two streams (exact over one part only)": re.sub(
            streams, "SETTINGS max_threads = 2)", planned.replace(f" {table} FINAL ", f" {table} ")
        ),
    }
    for label, statement in variants.items():
        steps[label] = lambda s=statement: transport.query(s)
    answers = {label: sorted(map(tuple, step())) for label, step in steps.items()}
    if any(answer != answers["as planned"] for answer in answers.values()):
        raise SystemExit("a variant's answer differs from the planned statement's")
    floors = {
        "without the total (a floor, not the answer)": counted(found, "d", "sum(h)"),
        "the account's rows, plainly: count()": f"SELECT count() FROM {table} WHERE {where}",
        "merged by key alone: count() FINAL": f"SELECT count() {rows}",
        "merged with hours: sum(length(hours)) FINAL": f"SELECT sum(length(hours)) {rows}",
        "each row's keys made: sum(length(d)) FINAL": f"SELECT sum(length({found})) {rows}",
        **{
            f"the second core: a sum over numbers_mt, max_threads = {threads}": (
                "SELECT sum(cityHash64(number)) FROM numbers_mt(20000000)"
                f" SETTINGS max_threads = {threads}"
            )
            for threads in (1, 2)
        },
    }
    for label, statement in floors.items():
        steps[label] = lambda s=statement: transport.query(s)
    ms = _in_turn(steps, runs)
    first = ms["as planned"]
    print("| Sessions' statement, heavy account, 90 days | median | this / planned |")
    print("|---|---:|---:|")
    for label, median in ms.items():
        print(f"| {label} | {median:.1f} ms | {median / first:.2f} |")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_chquery", description=__doc__)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--question", choices=sorted(SHORT), default="hourly")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--dir", type=Path, help="keep the chDB files here (reused if loaded)")
    parser.add_argument("--against", type=Path, help="another version's src/usagemeter")
    parser.add_argument("--sqlite", action="store_true", help="with --against: SQLite too")
    parser.add_argument(
        "--prototype",
        nargs="*",
        choices=sorted(PROTO_TABLES),
        help="only the distinct and latest questions of tables the schema does not have"
        " (these, or all)",
    )
    parser.add_argument(
        "--merged",
        nargs="*",
        choices=ROLLUPS,
        help="every question of the store and of a copy with these rollups merged (or all)",
    )
    parser.add_argument(
        "--final",
        action="store_true",
        help="only the Sessions statement's FINAL and variants of it, on the store as it is",
    )
    parser.add_argument(
        "--tail",
        type=int,
        default=0,
        help="first append a live tail of this many of the heavy account's Sessions, merges"
        " stopped (a small part beside the others)",
    )
    parser.add_argument(
        "--written",
        action="store_true",
        help="the store takes its distinct values as written moments ago, for the whole run"
        " (as the process that backfilled or appended them does for a minute and a half)",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="time the comparisons and the breakdown in CPU time rather than wall time",
    )
    args = parser.parse_args(argv)
    if args.cpu:
        CLOCK[0] = time.process_time
    scratch = Path(tempfile.mkdtemp(prefix="usagemeter-profile-"))
    try:
        store = open_store(f"chdb:///{args.dir or scratch}/chdb")
        assert isinstance(store, ClickHouseStore)
        assert isinstance(store.transport, ChdbTransport)
        if store.count_events():  # loaded by an earlier run, the peer's table too
            peer = ChdbTransport(store.transport._shared.path, "bench")
        else:
            load(store, args.events)
            loader = Peer(store)
            loader.load(args.events)
            peer = loader.transport
        if store.id_index is not None:
            # The index of stored ids is read at open in a thread (chidindex.py): a core
            # busy for tens of seconds at 10M ids, not part of any question.
            store.id_index.wait()
        if args.written:  # this process's write, as if just made, however long the run
            store.values_written = math.inf
        if args.final:
            stop_merges(store)
        if args.tail:
            live_tail(store, args.tail)
        if args.merged is not None:  # the store as loaded: not settled meanwhile (chsettle)
            for table in ROLLUPS:
                store.transport.command(f"SYSTEM STOP MERGES {table}")
        query = questions()[SHORT[args.question]]
        engine = Engine(store)
        engine.run(query)  # warm
        # As the server does once started (api/app.py): what exists now lives on, frozen.
        gc.collect()
        gc.freeze()
        print(f"{store.count_events():,} events\n")
        if args.merged is not None:
            merged(store, peer, args.runs, args.merged or list(ROLLUPS))
            peer.close()
            store.close()
            return 0
        if args.final:
            final_variants(store, args.runs, args.against)
            peer.close()
            store.close()
            return 0
        if args.prototype is not None:
            prototype(store, peer, args.runs, args.prototype)
            peer.close()
            store.close()
            return 0
        if args.against:
            sqlite = None
            if args.sqlite:
                sqlite = open_store(f"sqlite:///{args.dir or scratch}/usage.db")
                if not sqlite.count_events():
                    load(sqlite, store.count_events())
                gc.collect()
                gc.freeze()
            engines(args.against, store, args.runs)
            against(args.against, store, peer, sqlite, args.runs)
            if sqlite is not None:
                sqlite.close()
        breakdown(store, peer, args.runs)
        spec = asked(store, query)
        (plan,) = store.plans(spec)
        (slots_plan,) = plan_aggregate(spec, hour_sets=False, coarse_tables=False)
        regular = chplan._regular
        chplan._regular = lambda pieces: None  # type: ignore[assignment]
        store._plans.clear()  # planned again, not the statements kept for these windows
        (joined_plan,) = store.plans(spec)
        chplan._regular = regular  # type: ignore[assignment]
        store._plans.clear()

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
            "store.aggregate_columns (query and decoding)": lambda: store.aggregate_columns(spec),
            "Engine.run, the collector off": without_collector,
        }
        spent: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.runs):
            for name, step in steps.items():
                began = time.perf_counter()
                step()
                spent[name].append((time.perf_counter() - began) * 1000)
        rows = len(store.transport.query(plan.sql))
        print(f"{SHORT[args.question]}: {rows:,} rows from the store\n")
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
        peer.close()  # its table stays with --dir, for the next run
        store.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
