"""A change to the ClickHouse store's write path beside the code before it: the same batches
appended by this checkout's store and by a second process running another checkout's
(``--against DIR``, a directory holding its ``usagemeter`` package, e.g. ``src`` of a
``git worktree`` of main), each on its own chDB directory, the two taking turns batch by
batch, so the machine's load weighs on both alike. Prints both rates, their ratio, and where
an append's time went in each (``bench.chstore``'s steps).

    python -m bench.chturns --against /tmp/main/src [--events 200000] [--clients N]

With ``--clients N`` each side appends bursts of 2N batches from N threads at once (as a
server's concurrent requests do, so that batches queue and share INSERTs), the two sides
taking turns burst by burst.

``--grouped N`` measures group commit instead, in one process: two stores on one chDB
session (a database each), the same batches sent to each by N client threads at once, a
burst of 2N batches to one store, then the same burst to the other, in turn. One store
writes the batches that queue together in one INSERT; the other, one INSERT per batch (as
before group commit). Prints both rates and the INSERTs each made.

    python -m bench.chturns --grouped 4 [--events 200000] [--batch 10000]

``--sets-views N`` measures the tables of sets' views (round 12) the same way, in one
process: two stores on one chDB session, one whose slots' and hour sets' views fold the
dimensions and tags by ``any()`` (as before round 12), one as this checkout makes them, the
same bursts of 2N batches from N clients to each, in turn. Prints both rates, the INSERT's
median per append, and the median ratio per burst.

    python -m bench.chturns --sets-views 4 [--events 300000]

``--latest-key N`` measures the tables of sets' latest value (round 15) the same way: one
store whose tables key it by the tuple (ts, seq), as a database made before round 15 keeps
them, one as this checkout makes them (one number, chschema.LATEST_KEY). Prints the rates,
the INSERT's median, the process's CPU per 10,000 events of each, and the median per burst.

    python -m bench.chturns --latest-key 4 [--events 300000]

``--lookup N`` measures the dedupe lookup (round 16) on ids as providers send them (random
UUIDs), in one process: event_ids in both layouts, each in a database of one chDB session
holding N random ids over the bench's accounts, merged into one part (the settled state), as
a new database makes it (ordered by the id, chschema.EVENT_IDS) and as one made before
round 16 keeps it ((account, id), chschema.EVENT_IDS_BY_ACCOUNT). Then, in turn, batches of
10,000 ids looked up as the store does (clickhouse.stored_digests_sql): new random ids, and
ids already stored (a retry), on the new layout, on the old one, and on the old one by the
statement before round 16; then an INSERT of 10,000 new ids into each, in turn. Prints the
medians and the granules the key kept.

    python -m bench.chturns --lookup 10000000 [--runs 11]

``--python`` measures the batch's Python alone (round 17), no database: the bench's events in
batches of 10,000, each prepared as an append prepares it in its caller's thread
(``chappend.Prepared``), then in groups of 4 what the writer does in Python around the lookup
and the INSERT (``Group``, ``sort_out``, ``group_columns``, ``token``), by this checkout and
by a second process running ``--against DIR``'s, the two taking turns pass by pass (A,B,B,A,
...). Prints each pass's medians, ms per 10,000 events, and their medians' ratio.

    python -m bench.chturns --python --against /tmp/main/src [--events 200000] [--runs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from bench.chstore import (
    ACCOUNTS,
    BATCH,
    PHASES,
    REST,
    _time_phases,
    append_concurrently,
    batches,
    generate,
)
from usagemeter.model import Account, Event
from usagemeter.store import open_store
from usagemeter.store.chtransport import ChdbTransport
from usagemeter.store.chupgrade import make_sets_views_before_round_12
from usagemeter.store.clickhouse import ClickHouseStore

ROOT = Path(__file__).resolve().parent.parent  # the checkout that holds bench/


def _loaded(count: int) -> tuple[ClickHouseStore, dict[str, float], Path]:
    scratch = Path(tempfile.mkdtemp(prefix="usagemeter-turns-"))
    store = open_store(f"chdb:///{scratch}/chdb")
    assert isinstance(store, ClickHouseStore)
    for n in range(ACCOUNTS):
        store.create_account(Account(f"acct-{n}", f"Account {n}"))
    phases: dict[str, float] = {}
    _time_phases(store, phases)
    return store, phases, scratch


def _append(store: ClickHouseStore, batch: list[Event]) -> float:
    began = time.perf_counter()
    store.append(batch)
    return time.perf_counter() - began


def _bursts(count: int, clients: int) -> list[list[list[Event]]]:
    """The batches in bursts of 2N (N clients), or one by one for one client."""
    sent = list(batches(count))
    size = 2 * clients if clients > 1 else 1
    return [sent[i : i + size] for i in range(0, len(sent), size)]


def _append_burst(store: ClickHouseStore, burst: list[list[Event]], clients: int) -> float:
    if clients > 1:
        return append_concurrently(store, burst, clients)
    return _append(store, burst[0])


def serve(count: int, clients: int) -> None:
    """The other side: one burst appended per line read, its seconds written back; the
    steps' seconds last."""
    store, phases, scratch = _loaded(count)
    print("ready", flush=True)
    for burst in _bursts(count, clients):
        sys.stdin.readline()
        print(_append_burst(store, burst, clients), flush=True)
    print(json.dumps(phases), flush=True)
    store.close()
    shutil.rmtree(scratch, ignore_errors=True)


def _steps(phases: dict[str, float], elapsed: float, batches_: int) -> dict[str, float]:
    """Milliseconds per append in each step, and in the rest (bench.chstore.REST)."""
    steps = {label: phases.get(label, 0.0) for label in dict.fromkeys(PHASES.values())}
    steps[REST] = elapsed - sum(steps.values())
    steps["append, in all"] = elapsed
    return {label: seconds / batches_ * 1000 for label, seconds in steps.items()}


def grouped(count: int, clients: int, size: int = BATCH) -> None:
    """Group commit against one INSERT per batch, in turn by bursts (see the docstring)."""
    scratch = Path(tempfile.mkdtemp(prefix="usagemeter-grouped-"))
    stores = [
        ClickHouseStore(ChdbTransport(f"{scratch}/chdb", database), str(scratch / database))
        for database in ("grouped", "alone")
    ]
    stores[1]._group_commit._max_size = 1  # every group holds one batch
    inserts = [0, 0]
    for i, store in enumerate(stores):
        for n in range(ACCOUNTS):
            store.create_account(Account(f"acct-{n}", f"Account {n}"))
        insert = store.transport.insert_columns

        def counted(table: str, *args: object, _i: int = i, _insert: Any = insert) -> None:
            inserts[_i] += table == "events"
            _insert(table, *args)

        store.transport.insert_columns = counted  # type: ignore[method-assign]
    spent = [0.0, 0.0]
    ratios = []  # per burst: the INSERT-per-batch store's seconds over the grouped one's
    events = list(generate(count))
    pending = [events[i : i + size] for i in range(0, count, size)]
    try:
        while pending:
            burst, pending = pending[: 2 * clients], pending[2 * clients :]
            took = [0.0, 0.0]
            # Which store goes first alternates, so that neither always follows the other.
            for i in (0, 1) if len(ratios) % 2 == 0 else (1, 0):
                took[i] = append_concurrently(stores[i], burst, clients)
                spent[i] += took[i]
            ratios.append(took[1] / took[0])
    finally:
        for store in stores:
            store.close()
        shutil.rmtree(scratch, ignore_errors=True)
    count_batches = -(-count // size)
    print(f"{count:,} events, batches of {size:,}, {clients} clients at once, in turn\n")
    print("| | group commit | an INSERT per batch | ratio |")
    print("|---|---:|---:|---:|")
    rates = [count / spent[0], count / spent[1]]
    print(f"| ingest, events/s | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[0] / rates[1]:.2f} |")
    print(f"| INSERTs for {count_batches} batches | {inserts[0]} | {inserts[1]} | |")
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    print(
        f"\nper burst of {2 * clients} batches, an INSERT per batch / group commit: median"
        f" {statistics.median(ratios):.2f} (quartiles {quartiles[0]:.2f} to {quartiles[2]:.2f},"
        f" {len(ratios)} bursts)"
    )


def sets_views(count: int, clients: int) -> None:
    """The tables of sets' views before round 12 against this checkout's, in turn by bursts
    (see the docstring)."""
    layouts_in_turn(count, clients, "views before round 12 (any())")


def latest_key(count: int, clients: int) -> None:
    """The tables of sets' latest value keyed by the tuple (ts, seq), as before round 15,
    against this checkout's (one number), in turn by bursts (see the docstring)."""
    layouts_in_turn(count, clients, "latest keyed by (ts, seq)")


def _make_before(store: ClickHouseStore, before: str) -> None:
    if before.startswith("views before round 12"):
        make_sets_views_before_round_12(store.transport, store.hour_sets.boundary)


def layouts_in_turn(count: int, clients: int, before: str) -> None:
    """Two stores on one chDB session, one with a database as this checkout makes it, one
    as ``before`` names (made here: a database before round 15 keeps its tuple key, and
    one before round 12 had that too), the same bursts of 2N batches from N clients to
    each, in turn. The CPU of each burst is the process's (the chDB threads' included)."""
    # Imported here: --serve runs this module on another checkout's package (--against).
    from usagemeter.store.chschema import TUPLE_TABLES_OF_SETS

    scratch = Path(tempfile.mkdtemp(prefix="usagemeter-layouts-"))
    transports = [ChdbTransport(f"{scratch}/chdb", database) for database in ("now", "before")]
    for statement in TUPLE_TABLES_OF_SETS:  # before round 15
        transports[1].command(statement)
    stores = [
        ClickHouseStore(transport, str(scratch / transport.database)) for transport in transports
    ]
    assert stores[0].keyed_latest and not stores[1].keyed_latest
    _make_before(stores[1], before)
    inserts: list[list[float]] = [[], []]
    for i, store in enumerate(stores):
        for n in range(ACCOUNTS):
            store.create_account(Account(f"acct-{n}", f"Account {n}"))
        insert = store.transport.insert_columns

        def timed(table: str, *args: Any, _i: int = i, _insert: Any = insert) -> None:
            began = time.perf_counter()
            _insert(table, *args)
            inserts[_i].append(time.perf_counter() - began)

        store.transport.insert_columns = timed  # type: ignore[method-assign]
    spent, cpu = [0.0, 0.0], [0.0, 0.0]
    ratios = []  # per burst: the store before's seconds over this checkout's
    bursts = _bursts(count, clients)
    try:
        for burst in bursts:
            took = [0.0, 0.0]
            for i in (0, 1) if len(ratios) % 2 == 0 else (1, 0):
                began = time.process_time()
                took[i] = _append_burst(stores[i], burst, clients)
                cpu[i] += time.process_time() - began
                spent[i] += took[i]
            ratios.append(took[1] / took[0])
    finally:
        for store in stores:
            store.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{count:,} events, batches of {BATCH:,}, {clients} clients at once, in turn\n")
    print(f"| | now | {before} | ratio |")
    print("|---|---:|---:|---:|")
    rates = [count / spent[0], count / spent[1]]
    print(f"| ingest, events/s | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[0] / rates[1]:.2f} |")
    ms = [statistics.median(took) * 1000 for took in inserts]
    print(f"| INSERT, median ms | {ms[0]:.1f} | {ms[1]:.1f} | {ms[1] / ms[0]:.2f} |")
    per = [c * 1000 / (count / BATCH) for c in cpu]
    print(f"| CPU per 10,000 events, ms | {per[0]:.1f} | {per[1]:.1f} | {per[1] / per[0]:.2f} |")
    print(f"| INSERTs | {len(inserts[0])} | {len(inserts[1])} | |")
    median = statistics.median(ratios)
    print(f"\nper burst, before / now: median {median:.2f} ({len(ratios)} bursts)")


# The dedupe lookup's statement before round 16 (the ids in WHERE beside the accounts).
_LOOKUP_BEFORE = (
    "SELECT account, id, digest FROM event_ids WHERE account IN ({accounts}) AND id IN"
    " (SELECT i FROM format(JSONCompactColumns, 'i String', {ids}))"
)


def lookup(stored: int, runs: int) -> None:
    """The dedupe lookup of random ids in both layouts of event_ids, in turn (see the
    docstring)."""
    # Imported here: --serve runs this module on another checkout's package (--against).
    import random
    import re
    import uuid

    import msgspec

    from usagemeter.store.chschema import EVENT_IDS, EVENT_IDS_BY_ACCOUNT
    from usagemeter.store.chtransport import literal, literals
    from usagemeter.store.clickhouse import stored_digests_sql

    scratch = Path(tempfile.mkdtemp(prefix="usagemeter-lookup-"))
    layouts = {"by id": EVENT_IDS, "by account": EVENT_IDS_BY_ACCOUNT}
    transports = {
        name: ChdbTransport(f"{scratch}/chdb", name.replace(" ", "_")) for name in layouts
    }
    accounts = [f"acct-{n}" for n in range(ACCOUNTS)]
    # As bench.chstore's events: a third in the heavy account, the rest spread.
    account_sql = "if(rand() % 100 < 33, 'acct-0', concat('acct-', toString(1 + rand(1) % 99)))"
    try:
        for name, ddl in layouts.items():
            transports[name].command(ddl)
        # The same ids in both: made in the first, copied into the second.
        for first in range(0, stored, 1_000_000):
            transports["by id"].command(
                f"INSERT INTO event_ids SELECT {account_sql}, toString(generateUUIDv4()),"
                f" hex(MD5(toString(number))) FROM numbers({first},"
                f" {min(1_000_000, stored - first)})"
            )
        transports["by account"].command("INSERT INTO event_ids SELECT * FROM by_id.event_ids")
        for transport in transports.values():
            transport.command("OPTIMIZE TABLE event_ids FINAL")
        rng = random.Random(16)

        def new_ids() -> tuple[list[str], list[str]]:
            ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(BATCH)]
            return ids, accounts

        def stored_ids() -> tuple[list[str], list[str]]:
            rows = transports["by id"].query(
                f"SELECT account, id FROM event_ids ORDER BY rand() LIMIT {BATCH}"
            )
            return [row[1] for row in rows], sorted({row[0] for row in rows})

        def before(group: list[str], names: list[str]) -> str:
            listed = literal(msgspec.json.encode([group]).decode())
            return _LOOKUP_BEFORE.format(accounts=literals(names), ids=listed)

        cases = {
            "by id, now": ("by id", lambda g, a: stored_digests_sql(a, g)),
            "by account, now": ("by account", lambda g, a: stored_digests_sql(a, g)),
            "by account, before": ("by account", before),
        }
        taken: dict[tuple[str, str], list[float]] = {}
        granules: dict[tuple[str, str], str] = {}
        for run in range(runs):
            for kind, ask in (("new ids", new_ids), ("stored ids", stored_ids)):
                group, names = ask()
                order = list(cases) if run % 2 == 0 else list(cases)[::-1]
                for case in order:
                    layout, sql = cases[case]
                    statement = sql(group, names)
                    began = time.perf_counter()
                    found = transports[layout].query(statement)
                    taken.setdefault((case, kind), []).append(time.perf_counter() - began)
                    assert len(found) == (0 if kind == "new ids" else BATCH)
                    if run == 0:
                        plan = transports[layout].query(f"EXPLAIN indexes = 1 {statement}")
                        text = " ".join(str(row[0]) for row in plan)
                        granules[(case, kind)] = re.findall(r"Granules: (\d+/\d+)", text)[-1]
        # What each layout costs a write: a batch of new ids inserted (fsynced, as the
        # store's INSERT writes event_ids' part), in turn.
        for run in range(runs):
            group, names = new_ids()
            rows = {"account": [names[n % len(names)] for n in range(BATCH)], "id": group}
            rows["digest"] = ["0" * 32] * BATCH
            for layout in layouts if run % 2 == 0 else list(layouts)[::-1]:
                began = time.perf_counter()
                transports[layout].insert_columns("event_ids", rows)
                taken.setdefault((layout, "insert"), []).append(time.perf_counter() - began)
    finally:
        for transport in transports.values():
            transport.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{stored:,} random ids stored (one part), batches of {BATCH:,}, {runs} in turn\n")
    print("| event_ids, statement | new ids, median ms | granules | stored ids | granules |")
    print("|---|---:|---:|---:|---:|")
    for case in cases:
        cells = []
        for kind in ("new ids", "stored ids"):
            cells += [
                f"{statistics.median(taken[(case, kind)]) * 1000:.1f}",
                granules[(case, kind)],
            ]
        print(f"| {case} | " + " | ".join(cells) + " |")
    inserts = [f"{statistics.median(taken[(layout, 'insert')]) * 1000:.1f}" for layout in layouts]
    print(
        f"\nan INSERT of {BATCH:,} new ids, median ms: by id {inserts[0]}, by account {inserts[1]}"
    )


def python_pass(sent: list[list[Event]]) -> dict[str, float]:
    """One pass over ``sent``: the median ms of preparing a batch, and of the writer's Python
    for a group of 4 batches, per 10,000 events."""
    from usagemeter.store import chappend

    # Each pass from an empty cache of the sets' ids, as a store opened for the load finds it
    # (the Sessions' 200,000 values then miss it as in bench.chstore's load).
    chappend.set_id.cache_clear()
    prepare: list[float] = []
    ready: list[chappend.Prepared] = []
    for batch in sent:
        began = time.perf_counter()
        ready.append(chappend.Prepared(batch))
        prepare.append((time.perf_counter() - began) * 1000 * BATCH / len(batch))
    write: list[float] = []
    for first in range(0, len(ready), 4):
        group_of = ready[first : first + 4]
        began = time.perf_counter()
        group = chappend.Group(group_of)
        _, picks = chappend.sort_out(group_of, {}, len(group.pairs))
        chappend.token(chappend.group_columns(group_of, picks, 1))
        spent = (time.perf_counter() - began) * 1000
        write.append(spent * BATCH / sum(len(b.events) for b in group_of))
    return {"prepared": statistics.median(prepare), "writer": statistics.median(write)}


def serve_python(count: int) -> None:
    """The other side of --python: a pass per line read, its medians written back."""
    sent = list(batches(count))
    print("ready", flush=True)
    while sys.stdin.readline().strip() == "go":
        print(json.dumps(python_pass(sent)), flush=True)


def _other_checkout(against: str, *args: str) -> tuple[subprocess.Popen[str], IO[str], IO[str]]:
    """This bench run by the other checkout (``against``, its src) with ``args``, its
    stdin and stdout; started once it says it is ready."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([against, str(ROOT)])}
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.chturns", *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    into: IO[str] = child.stdin  # type: ignore[assignment]
    out: IO[str] = child.stdout  # type: ignore[assignment]
    if out.readline().strip() != "ready":
        raise SystemExit("the other checkout did not start")
    return child, into, out


def python_in_turn(count: int, against: str, runs: int) -> None:
    """--python: this checkout's passes and the other's, A,B,B,A, ... (see the docstring)."""
    child, into, out = _other_checkout(against, "--serve-python", "--events", str(count))
    sent = list(batches(count))

    def theirs() -> dict[str, float]:
        into.write("go\n")
        into.flush()
        answer: dict[str, float] = json.loads(out.readline())
        return answer

    passes: dict[str, list[dict[str, float]]] = {"ours": [], "theirs": []}
    for run in range(runs):
        turns = ("ours", "theirs") if run % 2 == 0 else ("theirs", "ours")
        for side in turns:
            passes[side].append(python_pass(sent) if side == "ours" else theirs())
    into.write("stop\n")
    into.flush()
    child.wait()
    print(f"{count:,} events, batches of {BATCH:,}, groups of 4, {runs} passes each in turn\n")
    print(f"| ms per 10,000 events | this checkout | {against} | ratio |")
    print("|---|---:|---:|---:|")
    for step, label in (("prepared", "Prepared (caller's thread)"), ("writer", "writer's Python")):
        ours = [p[step] for p in passes["ours"]]
        other = [p[step] for p in passes["theirs"]]
        print(
            f"| {label}, passes | {' / '.join(f'{v:.1f}' for v in ours)}"
            f" | {' / '.join(f'{v:.1f}' for v in other)} | |"
        )
        mine, their = statistics.median(ours), statistics.median(other)
        print(f"| {label}, median | {mine:.2f} | {their:.2f} | {their / mine:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chturns", description=__doc__)
    parser.add_argument("--against", help="a directory holding the other usagemeter package")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--grouped", type=int, metavar="N", help="group commit, N clients")
    parser.add_argument("--batch", type=int, default=BATCH, help="events per batch (--grouped)")
    parser.add_argument(
        "--sets-views", type=int, metavar="N", help="the tables of sets' views, N clients"
    )
    parser.add_argument(
        "--latest-key", type=int, metavar="N", help="the latest value's key, N clients"
    )
    parser.add_argument(
        "--clients", type=int, default=1, help="--against: bursts of 2N batches from N threads"
    )
    parser.add_argument(
        "--lookup", type=int, metavar="N", help="the dedupe lookup among N random ids"
    )
    parser.add_argument(
        "--runs", type=int, default=11, help="--lookup: lookups of each kind; --python: passes"
    )
    parser.add_argument(
        "--python", action="store_true", help="the batch's Python alone, with --against DIR"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-python", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.events, args.clients)
        return 0
    if args.serve_python:
        serve_python(args.events)
        return 0
    if args.grouped:
        grouped(args.events, args.grouped, args.batch)
        return 0
    if args.sets_views:
        sets_views(args.events, args.sets_views)
        return 0
    if args.latest_key:
        latest_key(args.events, args.latest_key)
        return 0
    if args.lookup:
        lookup(args.lookup, args.runs)
        return 0
    if not args.against or not (Path(args.against) / "usagemeter").is_dir():
        raise SystemExit("--against DIR: DIR must hold a usagemeter package (a checkout's src)")
    if args.python:
        python_in_turn(args.events, args.against, args.runs)
        return 0
    child, into, out = _other_checkout(
        args.against, "--serve", "--events", str(args.events), "--clients", str(args.clients)
    )
    store, phases, scratch = _loaded(args.events)
    spent = [0.0, 0.0]
    try:
        for burst in _bursts(args.events, args.clients):
            spent[0] += _append_burst(store, burst, args.clients)
            into.write("go\n")
            into.flush()
            spent[1] += float(out.readline())
        theirs = json.loads(out.readline())
        child.wait()
    finally:
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)
    count = -(-args.events // BATCH)
    ours_steps = _steps(phases, spent[0], count)
    their_steps = _steps(theirs, spent[1], count)
    clients = f", {args.clients} clients at once" if args.clients > 1 else ""
    print(f"{args.events:,} events, batches of {BATCH:,}{clients}, taken in turn\n")
    print(f"| | this checkout | {args.against} | ratio |")
    print("|---|---:|---:|---:|")
    rates = [args.events / spent[0], args.events / spent[1]]
    print(f"| ingest, events/s | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[0] / rates[1]:.2f} |")
    for label, ms in ours_steps.items():
        other = their_steps[label]
        ratio = f"{other / ms:.2f}" if ms > 0 else ""
        print(
            f"| {label}, ms per append (µs per event) | {ms:.1f} ({ms * 1000 / BATCH:.1f})"
            f" | {other:.1f} ({other * 1000 / BATCH:.1f}) | {ratio} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
