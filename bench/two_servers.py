"""Live ingest into one PostgreSQL database through one, then two `usagemeter serve` processes:
`python -m bench.two_servers [--events N] [--clients C] [--batch B]`.

The bench's durable cluster (bench/pgstore.py) and its generated events; each run loads a
fresh database, the same events in the same batches, half of them to each server when there
are two. Prints events/s for each, and checks the stored total.

The machine is shared, so events/s moves with whatever else runs. Beside it the bench prints
what the load cost in CPU: seconds of the usagemeter processes and of the PostgreSQL server
(its backends included), and so events per CPU second, which other work changes far less.
That is the figure to compare two versions by, and what an idle machine's rate follows: on
C cores of its own, ingest can reach about C x events per CPU second.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psycopg

from bench import generate as g
from bench import render
from bench.httpload import LoadResult, post_all
from bench.ours import Service, process_tree
from bench.pgstore import StoreCluster

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process, its live descendants and the children it has
    reaped: PostgreSQL's backends end with their connections, and the postmaster reaps them."""
    total = 0
    for n, p in enumerate(process_tree(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if n == 0:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / TICKS


class WaitSampler:
    """What the database's busy backends are doing, sampled every 20 ms while the load runs
    (pg_stat_activity): running, or waiting, and on what (a row lock held by another batch,
    the WAL's fsync, ...). Counts are backend-samples, so their shares add up to the average
    number of busy backends."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples = 0
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(0.02):
                rows = conn.execute(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'running')"
                    " FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid()"
                    " AND backend_type = 'client backend'"
                ).fetchall()
                self.samples += 1
                self.counts.update(r[0] for r in rows)

    def summary(self) -> str:
        n = max(self.samples, 1)
        parts = [f"{what} {count / n:.2f}" for what, count in self.counts.most_common(5)]
        return "busy backends on average: " + ", ".join(parts)


def live(events: g.Events, minutes: float) -> g.Events:
    """The same events in time order, their timestamps squeezed into the window's last
    ``minutes`` (order kept): what live traffic looks like to the rollups, whose rows a
    batch then mostly updates rather than inserts."""
    order = np.argsort(events.ts, kind="stable")
    span = int(minutes * 60_000)
    ts = g.DAYS * g.DAY_MS - span + np.linspace(0, span - 1, len(events)).astype(np.int64)
    columns = {name: getattr(events, name)[order] for name in g.COLUMNS if name != "ts"}
    return g.Events(first=events.first, ts=ts, **columns)


def waiting(url: str) -> int:
    """Events stored but not yet folded into the rollups (0 where every batch folds its own)."""
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute("SELECT to_regclass('unfolded')").fetchone()
        if not found or found[0] is None:
            return 0
        row = conn.execute("SELECT count(*) FROM unfolded").fetchone()
    return int(row[0]) if row else 0


def settle(url: str) -> tuple[float, int]:
    """Wait until the servers have folded every event the load left waiting: (seconds,
    events that were waiting). The bench counts that time and its CPU, so that work put
    off is not counted as done."""
    start = time.perf_counter()
    left = first = waiting(url)
    while left:
        time.sleep(0.02)
        left = waiting(url)
    return time.perf_counter() - start, first


def _load(services: list[Service], bodies: list[bytes], clients: int) -> tuple[float, int]:
    """Post every body, split evenly across the services at once; (seconds, accepted)."""
    results: list[LoadResult] = [LoadResult() for _ in services]
    share = [bodies[n :: len(services)] for n in range(len(services))]

    def run(n: int) -> None:
        s = services[n]
        results[n] = post_all("127.0.0.1", s.port, s.headers, "/v1/events", share[n], clients)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(services))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if r.errors:
            raise RuntimeError(r.errors[0])
    return max(r.seconds for r in results), sum(r.accepted for r in results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.two_servers", description=__doc__)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--clients", type=int, default=4, help="concurrent clients per server")
    p.add_argument(
        "--servers", type=int, nargs="+", default=[1, 2], help="server counts to run, in order"
    )
    p.add_argument(
        "--live",
        type=float,
        default=0,
        metavar="MINUTES",
        help="send the events in time order, spread over the window's last MINUTES (live"
        " traffic) instead of the bench's 120 days in random order (a backfill)",
    )
    args = p.parse_args(argv)
    start_ms = g.window_start_ms(dt.datetime.now(dt.UTC).date())
    events = g.all_events(1, args.events)
    if args.live:
        events = live(events, args.live)
    bodies = render.json_batches(events, start_ms, args.batch)
    accounts = [g.account_id(a) for a in range(g.ACCOUNTS)]
    keys = [(a, g.key_id(i, k)) for i, a in enumerate(accounts) for k in range(g.KEYS_PER_ACCOUNT)]
    cluster = StoreCluster()
    try:
        for servers in args.servers:
            name = f"usagemeter{servers}"
            cluster.execute(f"DROP DATABASE IF EXISTS {name}")
            cluster.execute(f"CREATE DATABASE {name}")
            url = cluster.url.replace("/usagemeter?", f"/{name}?")
            services = [Service(store=url) for _ in range(servers)]
            try:
                for s in services:
                    s.start()
                services[0].create(accounts, keys)
                pids = [cluster.postmaster_pid(), *(s.pid for s in services)]
                before = [cpu_seconds(pid) for pid in pids]
                client_before = time.process_time()
                with WaitSampler(url) as waits:
                    seconds, accepted = _load(services, bodies, args.clients)
                    folding, left = settle(url)
                seconds += folding
                spent = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
                client = time.process_time() - client_before
            finally:
                for s in services:
                    s.close()
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM events").fetchone()
            stored = int(row[0]) if row else 0
            cpu = sum(spent)
            print(
                f"{servers} server(s), {args.clients} clients each, batches of {args.batch}: "
                f"{accepted:,} events in {seconds:.1f} s = {accepted / seconds:,.0f} events/s; "
                f"CPU {sum(spent[1:]):.1f} s usagemeter + {spent[0]:.1f} s PostgreSQL"
                f" = {accepted / cpu:,.0f} events per CPU second; stored {stored:,}",
                flush=True,
            )
            print(
                f"  {waits.summary()}; {left:,} events waited to be folded when the load"
                f" ended, folded in {folding:.2f} s (counted above)",
                flush=True,
            )
            # What bounds the rate on this machine: the CPU one event costs the servers, the
            # database and the bench's own clients (which share the cores), against the cores.
            per_event = [1e6 * t / accepted for t in (sum(spent[1:]), spent[0], client)]
            cores = os.cpu_count() or 1
            print(
                f"  CPU per event: {per_event[0]:.1f} us usagemeter, {per_event[1]:.1f} us"
                f" PostgreSQL, {per_event[2]:.1f} us the bench's clients; all {cores} cores"
                f" busy with nothing else: {cores * 1e6 / sum(per_event):,.0f} events/s at most",
                flush=True,
            )
            if stored != len(events):
                print(f"FAIL: sent {len(events):,}, stored {stored:,}", file=sys.stderr)
                return 1
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
