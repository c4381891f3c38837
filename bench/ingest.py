"""Ingest only, in minutes: `python -m bench.run --ingest-only` (or `python -m bench.ingest`).

Each workload's rate, and its ratio to a bare-SQLite floor measured in the same run: the same
rows written into a bare table with one unique (account, id) index, WAL, synchronous=FULL, one
commit per 1,000 rows. The machine is shared, so absolute rates move from run to run; the
ratio to the floor, measured a moment before, is the figure to compare between runs. On a
crowded machine even that ratio moves (the floor runs alone, our server beside its clients),
so the CPU time each event cost is shown too: the server process's (or the `ingest`
process's) user + system time over the events, against the floor's own.

The rollups catch up after the events are acknowledged (the server folds what waits once
appends pause, or once many wait), so each HTTP workload is also measured until its events
were folded too: the rate over the time until then, and the CPU per event with the fold's.

Workloads (every event acknowledged only once durable):
- live: events of the last hours in time order, 4 clients, batches of 1,000, a fresh store;
- backfill: events spread over 120 days and 1,000 accounts (the bench's data), into a store
  that already holds ``--prefill`` events;
- single: one-event requests from 8 clients for ``--single-seconds``;
- file: ``usagemeter ingest`` of an NDJSON file (in time order, as an export is), its own
  process on its own database.

``--backfill-into PATH`` measures only the backfill, into a copy of a store already made (the
10M store of `bench.run --full`, say; PATH itself is only read): how the write path does once
its B-trees outgrow the writer's cache, which a store of 400,000 never shows. With ``--against
SRC`` (another checkout's ``src/usagemeter``) it serves this code and SRC in turn, ``--pairs``
times, each on a fresh copy: on a shared machine only figures taken side by side compare. Each
run also says the server's peak RSS apart: anonymous memory (the caches, Python) and pages of
files it maps (a store read through ``mmap`` would show there, not in the former).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench import generate as g
from bench import render, report
from bench.ours import Service, _executable, process_tree
from usagemeter.store import sqlite as sqlite_store

SINGLE_ACCOUNT = "acct_single"
LIVE_FIRST = 900_000_000  # event ids of the live and file workloads: apart from the backfill's
FILE_FIRST = 950_000_000
LIVE_HOURS = 6
FLOOR_COMMIT = 1000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    p.add_argument("--live", type=int, default=200_000, help="live events (default 200k)")
    p.add_argument("--prefill", type=int, default=200_000, help="events stored before backfill")
    p.add_argument("--backfill", type=int, default=100_000, help="backfill events measured")
    p.add_argument("--single-seconds", type=float, default=10.0, help="single-event run, s")
    p.add_argument("--file-events", type=int, default=200_000, help="NDJSON lines to import")
    p.add_argument("--clients", type=int, default=4, help="concurrent batch clients")
    p.add_argument("--batch", type=int, default=1000, help="events per request")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--anchor", type=dt.date.fromisoformat, help="data window end, YYYY-MM-DD")
    p.add_argument("--output", type=Path, help="also write the table (markdown) here")
    p.add_argument(
        "--backfill-into",
        type=Path,
        metavar="PATH",
        help="only a backfill of --backfill events into a copy of this SQLite store",
    )
    p.add_argument(
        "--against",
        type=Path,
        metavar="SRC",
        help="with --backfill-into: also serve this usagemeter package, in turn with ours",
    )
    p.add_argument("--pairs", type=int, default=1, help="with --against: runs of each, in turn")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- the events


class ServedBy(Service):
    """The bench's server, run from the package ``code`` (another checkout's) if given. Its
    operator key is made by that code too: this code's would open the store first, and a
    store this code has upgraded is not one the other code knows (round 13's event_times,
    built once on opening, made the code before rebuild every rollup of the 10M store)."""

    def __init__(self, code: Path | None, root: Path) -> None:
        self.code = code
        super().__init__(root)

    def _snapshot(self) -> dict[str, str]:
        env = super()._snapshot()
        if self.code is not None:  # the package Service copied: this one instead
            served = self.root / "code" / "usagemeter"
            shutil.rmtree(served)
            shutil.copytree(self.code, served, ignore=shutil.ignore_patterns("__pycache__"))
        return env


def live_events(seed: int, n: int) -> g.Events:
    """The bench's accounts, metrics and dimensions, stamped over the last LIVE_HOURS hours
    of the window in time order: what a running service sends."""
    drawn = g.concat(list(g.iter_events(seed, g.CHUNK, g.CHUNK + n)))
    span = LIVE_HOURS * 3_600_000
    ts = g.DAYS * g.DAY_MS - span + np.arange(n, dtype=np.int64) * span // max(n, 1)
    return dataclasses.replace(drawn, first=LIVE_FIRST, ts=ts)


def time_ordered(events: g.Events, first: int) -> g.Events:
    order = np.argsort(events.ts, kind="stable")
    cols = {name: getattr(events, name)[order] for name in g.COLUMNS}
    return g.Events(first=first, **cols)


def floor_rows(events: g.Events, start_ms: int) -> list[tuple[object, ...]]:
    """The events as a bare table's rows: names as text, dimensions and tags as JSON."""
    accounts = [g.account_id(a) for a in range(g.ACCOUNTS)]
    dims = render._dims_json
    tags = render._tags_json
    return [
        (accounts[a], f"e{i}", g.METRICS[m], ts, g.key_id(a, k), v, b, dims(m, a, d, d2), tags(t))
        for i, ts, a, k, m, v, b, d, d2, t in render.rows(events, start_ms)
    ]


class RssApart:
    """The peak, over a process tree, of its anonymous pages and of the file pages it maps
    (``RssAnon`` and ``RssFile``, in bytes), sampled until stopped."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every = pid, every
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        for pid in process_tree(self.pid):
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            fields = {line.split(":")[0]: line.split()[1:2] for line in lines}
            self.anon = max(self.anon, int((fields.get("RssAnon") or ["0"])[0]) * 1024)
            self.file = max(self.file, int((fields.get("RssFile") or ["0"])[0]) * 1024)

    def stop(self) -> tuple[int, int]:
        self.sample()
        self._stop.set()
        self._thread.join()
        return self.anon, self.file


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def floor_rate(
    directory: Path, rows: list[tuple[object, ...]], prefill: list[tuple[object, ...]] = ()
) -> tuple[float, float]:
    """Events/s of the bare-SQLite floor for `rows`, after `prefill` rows (not timed), and
    the CPU seconds it used."""
    path = directory / "floor.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(
            "CREATE TABLE events (account TEXT, id TEXT, metric TEXT, ts INTEGER, key TEXT,"
            " value REAL, billable INTEGER, dims TEXT, tags TEXT)"
        )
        conn.execute("CREATE UNIQUE INDEX events_dedupe ON events (account, id)")
        insert = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        conn.execute("BEGIN")
        conn.executemany(insert, prefill)
        conn.execute("COMMIT")
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(rows), FLOOR_COMMIT):
            conn.execute("BEGIN")
            conn.executemany(insert, rows[i : i + FLOOR_COMMIT])
            conn.execute("COMMIT")
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return len(rows) / seconds, cpu


# ---------------------------------------------------------------------- the workloads


@dataclasses.dataclass
class Figure:
    workload: str
    events: int
    seconds: float
    cpu: float  # CPU seconds our process used for them
    floor: float | None = None  # events/s of the bare table for the same rows
    floor_cpu: float = 0.0  # CPU seconds the bare table used
    unit: str = "events/s"
    # Until the rollups held them too: the fold that follows the last acknowledgement.
    folded_seconds: float = 0.0
    folded_cpu: float = 0.0
    # The server's peak RSS apart (RssApart), where measured: anonymous and mapped files.
    rss_anon: int = 0
    rss_file: int = 0

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.events * 1e6

    @property
    def folded_rate(self) -> float:
        return self.events / (self.seconds + self.folded_seconds)

    @property
    def folded_cpu_us(self) -> float:
        return (self.cpu + self.folded_cpu) / self.events * 1e6

    @property
    def floor_cpu_us(self) -> float:
        return self.floor_cpu / self.events * 1e6


class IngestBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        anchor = args.anchor or dt.datetime.now(dt.UTC).date()
        self.start_ms = g.window_start_ms(anchor)
        self.figures: list[Figure] = []
        self.peak_rss = 0

    def settle(self, service: Service) -> tuple[float, float]:
        """Wait until the store's rollups hold every stored event (the server folds what
        waits once appends pause) and any merge of their recent level that the run made due
        is done (a store of two levels moves work from the fold to the merge, so the figure
        folded too includes it): the seconds waited and the server's CPU seconds."""
        assert service.proc is not None
        cpu, started = cpu_seconds(service.proc.pid), time.perf_counter()
        conn = sqlite3.connect(f"file:{service.store}?mode=ro", uri=True)
        folding = "(SELECT seq FROM folded) < (SELECT coalesce(max(seq), 0) FROM events)"
        leveled = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'recent_events'"
        ).fetchone()
        if leveled:
            folding += f" OR (SELECT events FROM recent_events) >= {sqlite_store.MERGE_EVENTS}"
        try:
            while conn.execute(f"SELECT {folding}").fetchone()[0]:
                time.sleep(0.02)
        finally:
            conn.close()
        return time.perf_counter() - started, cpu_seconds(service.proc.pid) - cpu

    def post(self, service: Service, events: g.Events) -> tuple[int, float, float]:
        """Events accepted, seconds, and the server's CPU seconds."""
        bodies = render.json_batches(events, self.start_ms, self.args.batch)
        assert service.proc is not None
        cpu = cpu_seconds(service.proc.pid)
        res = service.post_events(bodies, self.args.clients)
        cpu = cpu_seconds(service.proc.pid) - cpu
        if res.errors:
            raise RuntimeError(f"POST /v1/events failed: {res.errors[0]}")
        if res.accepted != len(events):
            raise RuntimeError(f"sent {len(events)} events, {res.accepted} accepted")
        return res.accepted, res.seconds, cpu

    def measure(
        self, service: Service, label: str, events: g.Events, floor: float, floor_cpu: float
    ) -> None:
        """Post ``events``, then wait for their fold: one figure of both."""
        n, seconds, cpu = self.post(service, events)
        folded, folded_cpu = self.settle(service)
        figure = Figure(label, n, seconds, cpu, floor, floor_cpu)
        self.add(dataclasses.replace(figure, folded_seconds=folded, folded_cpu=folded_cpu))

    def run(self) -> list[Figure]:
        a = self.args
        service = Service()
        tmp = service.root
        try:
            service.start()
            accounts = [g.account_id(i) for i in range(g.ACCOUNTS)]
            keys = [(acc, g.key_id(i, k)) for i, acc in enumerate(accounts) for k in range(5)]
            service.create([*accounts, SINGLE_ACCOUNT], keys)

            live = live_events(a.seed, a.live)
            floor, floor_cpu = floor_rate(tmp, floor_rows(live, self.start_ms))
            label = f"live: in time order, {a.clients} clients x {a.batch}"
            self.measure(service, label, live, floor, floor_cpu)

            self.single(service)

            log(f"backfill: storing {a.prefill:,} events first")
            prefill = g.concat(list(g.iter_events(a.seed, 0, a.prefill))) if a.prefill else None
            if prefill is not None:
                self.post(service, prefill)
                self.settle(service)
            backfill = g.concat(list(g.iter_events(a.seed, a.prefill, a.prefill + a.backfill)))
            before = floor_rows(prefill, self.start_ms) if prefill is not None else []
            floor, floor_cpu = floor_rate(tmp, floor_rows(backfill, self.start_ms), before)
            held = a.prefill + a.live
            label = f"backfill: 120 days, into {held:,} stored, {a.clients} x {a.batch}"
            self.measure(service, label, backfill, floor, floor_cpu)
            self.peak_rss = service.stop()

            self.file(tmp)
        finally:
            service.close()
        return self.figures

    def backfill_into(self, store: Path) -> list[Figure]:
        """Only the backfill, into a copy of ``store``; with ``--against``, this code's and
        the other's in turn, ``--pairs`` times."""
        a = self.args
        codes: list[Path | None] = [None, a.against] if a.against else [None]
        for _ in range(a.pairs if a.against else 1):
            for code in codes:
                self.backfill_into_once(store, code)
        return self.figures

    def backfill_into_once(self, store: Path, code: Path | None) -> None:
        """One backfill into a fresh copy of ``store``, served by this code or by the package
        ``code``: the bench's events with ids past those the store holds (its own events and
        a few of other workloads')."""
        a = self.args
        root = Path(tempfile.mkdtemp(prefix="usagemeter-bench-"))
        source = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        copy = sqlite3.connect(root / "usagemeter.db")
        try:
            log(f"backfill: copying {store}")
            source.backup(copy)
            held = int(copy.execute("SELECT count(*) FROM events").fetchone()[0])
        finally:
            copy.close()
            source.close()
        first = held + a.prefill  # past the bench's ids in the store and its own extra events
        backfill = g.concat(list(g.iter_events(a.seed, first, first + a.backfill)))
        service = ServedBy(code, root)
        try:
            service.start()
            assert service.proc is not None
            memory = RssApart(service.proc.pid)
            label = f"backfill: 120 days, into {held:,} stored (a copy), {a.clients} x {a.batch}"
            if a.against:
                label += f", {code if code is not None else 'this code'}"
            self.measure(service, label, backfill, 0.0, 0.0)
            anon, mapped = memory.stop()
            self.peak_rss = max(self.peak_rss, service.stop())
            log(f"peak RSS {anon / 2**20:.0f} MB anonymous, {mapped / 2**20:.0f} MB of files")
            figure = self.figures[-1]
            self.figures[-1] = dataclasses.replace(figure, rss_anon=anon, rss_file=mapped)
        finally:
            service.close()

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        ratio = f", {figure.rate / figure.floor:.2f}x the floor" if figure.floor else ""
        log(
            f"{figure.workload}: {figure.rate:,.0f} {figure.unit}{ratio},"
            f" {figure.cpu_us:.0f} us of CPU each"
        )

    def single(self, service: Service) -> None:
        ts = self.start_ms + g.DAYS * g.DAY_MS - 3_600_000
        bodies = [
            (
                f'[{{"id":"single-{i}","account":"{SINGLE_ACCOUNT}","metric":"requests",'
                f'"ts":{ts + i},"dimensions":{{"status":"200"}}}}]'
            ).encode()
            for i in range(200_000)
        ]
        assert service.proc is not None
        cpu = cpu_seconds(service.proc.pid)
        res = service.post_events(bodies, 8, max_seconds=self.args.single_seconds)
        cpu = cpu_seconds(service.proc.pid) - cpu
        if res.errors:
            raise RuntimeError(f"single-event ingest failed: {res.errors[0]}")
        figure = Figure("single events, 8 clients", res.requests, res.seconds, cpu)
        self.add(dataclasses.replace(figure, unit="requests/s"))
        self.settle(service)

    def file(self, tmp: Path) -> None:
        """`usagemeter ingest` of an NDJSON file into a database of its own."""
        from usagemeter.model import Account, ApiKey, Scope
        from usagemeter.store.sqlite import SQLiteStore

        a = self.args
        events = time_ordered(
            g.concat(list(g.iter_events(a.seed, 2 * g.CHUNK, 2 * g.CHUNK + a.file_events))),
            FILE_FIRST,
        )
        path = tmp / "import.ndjson"
        path.write_text("\n".join(render.event_json(events, self.start_ms)) + "\n")
        db = tmp / "import.db"
        store = SQLiteStore(db)
        created = dt.datetime.now(dt.UTC)
        for i in range(g.ACCOUNTS):
            store.create_account(Account(g.account_id(i), g.account_id(i)))
            for k in range(g.KEYS_PER_ACCOUNT):
                key = ApiKey(
                    g.key_id(i, k), g.account_id(i), "k", "ak_", frozenset({Scope.READ}), created
                )
                store.create_key(key, os.urandom(32))
        store.close()
        floor, floor_cpu = floor_rate(tmp, floor_rows(events, self.start_ms))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(
            [*_executable(), "ingest", str(path), "--db", str(db)],
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        label = "`usagemeter ingest` of an NDJSON file"
        self.add(Figure(label, len(events), seconds, cpu, floor, floor_cpu))


def render_table(figures: Sequence[Figure], peak_rss: int, machine: dict[str, str]) -> str:
    lines = [
        f"Load average (1 min) at the start: {machine.get('load', '?')}; "
        f"8 kB write + fdatasync: {machine.get('fsync', '?')}",
        "",
        "| workload | sent | rate | bare-SQLite floor, same rows | ratio "
        "| CPU per event: ours / floor | folded too: rate, ratio, CPU per event |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        floor = f"{f.floor:,.0f} events/s" if f.floor else "-"
        ratio = f"{f.rate / f.floor:.2f}x" if f.floor else "-"
        cpu = f"{f.cpu_us:.0f} µs / {f.floor_cpu_us:.0f} µs" if f.floor else f"{f.cpu_us:.0f} µs"
        folded = "-"  # the file's figure is until its command ended, its fold included
        if f.folded_seconds:
            folded_ratio = f" {f.folded_rate / f.floor:.2f}x," if f.floor else ""
            folded = f"{f.folded_rate:,.0f} {f.unit},{folded_ratio} {f.folded_cpu_us:.0f} µs"
        lines.append(
            f"| {f.workload} | {f.events:,} in {f.seconds:.1f} s | {f.rate:,.0f} {f.unit} "
            f"| {floor} | {ratio} | {cpu} | {folded} |"
        )
    lines.append("")
    lines.append(f"Server peak RSS (live, single, backfill): {peak_rss / 1024**2:.0f} MB")
    for n, f in enumerate(x for x in figures if x.rss_anon or x.rss_file):
        lines.append(
            f"Run {n + 1}, peak RSS apart: {f.rss_anon / 2**20:.0f} MB anonymous,"
            f" {f.rss_file / 2**20:.0f} MB of files ({f.workload})"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    machine = report.machine(Path(tempfile.gettempdir()))
    bench = IngestBench(args)
    figures = bench.backfill_into(args.backfill_into) if args.backfill_into else bench.run()
    text = render_table(figures, bench.peak_rss, machine)
    text += f"Load average after: {report.load_average()}; {time.perf_counter() - started:.0f} s\n"
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
