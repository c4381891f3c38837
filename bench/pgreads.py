"""Every question of bench.run's table on the PostgreSQL store beside the SQLite store:
`python -m bench.pgreads [--events N] [--trace]`.

Loads N of the bench's events (as bench.run does: HTTP batches of 1,000) into two real
`usagemeter serve` processes, one on a SQLite file and one on the bench's durable PostgreSQL
cluster, then asks each question of bench.run's table and each seed endpoint's default
request of both servers in turn, request by request, so that the machine's load falls on
both alike, and prints each one's median and the ratio (PostgreSQL store / SQLite store).
Minutes where bench.run takes most of an hour: it is the tool for a change to the read
path, beside its baseline.

With ``--trace`` it then sends each request once more through the app in process, on the
same PostgreSQL database, and prints the statements each sent to the server: how many round
trips a request makes, and which.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import psycopg

from bench import generate as g
from bench import questions as qs
from bench import render
from bench.ours import Service
from bench.pgstore import StoreCluster
from bench.run import SINGLE_ACCOUNT, TYPICAL_RANK
from bench.seeds import seed_requests


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


Request = tuple[str, Callable[[Service], httpx.Response]]


def requests_for(anchor: Any, account: int, label: str, secret_of: Any) -> list[Request]:
    """bench.run's questions and seed requests for one account, as calls on a server."""
    out: list[Request] = []
    for q in qs.question_set(anchor, account, label):

        def ask(s: Service, q: qs.Question = q) -> httpx.Response:
            assert s.client is not None
            return s.client.get("/v1/query", params=s.params(q))

        out.append((f"{label} {q.name}", ask))
    for index in range(5):

        def seed(s: Service, index: int = index) -> httpx.Response:
            req = seed_requests(s.secret, g.account_id(account), g.key_id(account, 0), anchor)
            return s.get(req[index].path, req[index].headers)

        name = seed_requests("", "", "", anchor)[index].name
        out.append((f"{label} {name}", seed))
    return out


def timed(fn: Callable[[], httpx.Response]) -> float:
    t0 = time.perf_counter()
    resp = fn()
    took = time.perf_counter() - t0
    if resp.status_code != 200:
        raise RuntimeError(f"{resp.request.url}: {resp.status_code} {resp.text[:300]}")
    return took


def compare(servers: dict[str, Service], requests: list[Request], runs: int) -> None:
    print("| request | SQLite store ms | PostgreSQL store ms | ratio |")
    print("|---|---|---|---|")
    ratios = []
    for name, call in requests:
        times: dict[str, list[float]] = {k: [] for k in servers}
        for s in servers.values():
            timed(lambda s=s, call=call: call(s))  # warm: a server's first answer is not counted
        for _ in range(runs):
            for k, s in servers.items():
                times[k].append(timed(lambda s=s, call=call: call(s)))
        lite, pg = (statistics.median(times[k]) * 1000 for k in ("sqlite", "postgresql"))
        ratios.append(pg / lite)
        print(f"| {name} | {lite:.2f} | {pg:.2f} | {pg / lite:.2f}x |", flush=True)
    print(f"\nratio: median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x")


@contextmanager
def statements() -> Iterator[list[tuple[str, float, Any]]]:
    """Every statement psycopg sends in this process meanwhile, with its client time and
    parameters (the whole text, with its values, where the cursor binds them itself)."""
    seen: list[tuple[str, float, Any]] = []
    originals = {cls: cls.execute for cls in (psycopg.Cursor, psycopg.ClientCursor)}

    def wrap(original: Any) -> Any:
        def execute(self: Any, query: Any, *args: Any, **kw: Any) -> Any:
            text = query if isinstance(query, str) else str(query)
            params = args[0] if args else kw.get("params")
            if isinstance(self, psycopg.ClientCursor):
                text, params = self.mogrify(query, *args[:1]), None
            t0 = time.perf_counter()
            try:
                return original(self, query, *args, **kw)
            finally:
                seen.append((" ".join(text.split()), time.perf_counter() - t0, params))

        return execute

    for cls, original in originals.items():
        cls.execute = wrap(original)  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        for cls, original in originals.items():
            cls.execute = original  # type: ignore[method-assign]


def trace(url: str, secret: str, requests: list[Request], explain: bool) -> None:
    from starlette.testclient import TestClient

    from usagemeter.api.app import create_app
    from usagemeter.store import open_store

    store = open_store(url)
    with (
        TestClient(create_app(store, close_store=True)) as client,
        psycopg.connect(url, autocommit=True) as side,
    ):
        client.headers["Authorization"] = f"Bearer {secret}"
        fake = Service.__new__(Service)
        fake.secret, fake.client = secret, client  # type: ignore[assignment]
        for name, call in requests:
            call(fake)  # caches filled
            with statements() as seen:
                t0 = time.perf_counter()
                call(fake)
                took = time.perf_counter() - t0
            sql = sum(t for _, t, _ in seen)
            print(f"\n{name}: {len(seen)} statements, {sql * 1000:.2f} of {took * 1000:.2f} ms")
            for text, t, params in seen:
                print(f"  {t * 1000:7.2f} ms  {text[:90]}")
                if explain and text.startswith("WITH w"):
                    plan = side.execute("EXPLAIN (ANALYZE, BUFFERS) " + text, params).fetchall()
                    print("\n".join("      " + row[0] for row in plan))


def against_round_7(url: str, secret: str, requests: list[Request], runs: int) -> None:
    """Each request through the app in process, with this round's statements and with round
    7's (no distinct values per hour, totals as a second pass), in turn on the same data."""
    from starlette.testclient import TestClient

    from usagemeter.api.app import create_app
    from usagemeter.store import open_store
    from usagemeter.store.sqlplan import POSTGRES

    def use(now: bool) -> None:
        POSTGRES.value_hours = POSTGRES.grouping_sets = now

    store = open_store(url)
    print("\n| request (in process) | round 7 ms | now ms | now / round 7 |")
    print("|---|---|---|---|")
    ratios = []
    with TestClient(create_app(store, close_store=True)) as client:
        client.headers["Authorization"] = f"Bearer {secret}"
        fake = Service.__new__(Service)
        fake.secret, fake.client = secret, client  # type: ignore[assignment]
        for name, call in requests:
            times: dict[bool, list[float]] = {False: [], True: []}
            answers = {}
            for now in (False, True):
                use(now)
                answers[now] = call(fake).json()  # warm, and the answers compared
            # (A seed endpoint's default range ends now: its answers are not compared.)
            if answers[False] != answers[True] and "GET" not in name:
                raise RuntimeError(f"{name}: the answers differ")
            for _ in range(runs):
                for now in (False, True):
                    use(now)
                    times[now].append(timed(functools.partial(call, fake)))
            before, after = (statistics.median(times[k]) * 1000 for k in (False, True))
            ratios.append(after / before)
            print(f"| {name} | {before:.2f} | {after:.2f} | {after / before:.2f}x |", flush=True)
    use(True)
    print(f"\nnow / round 7: median {statistics.median(ratios):.2f}x, best {min(ratios):.2f}x")


def wait_folded(url: str) -> None:
    """Wait until no event waits for its fold. A backfill of millions leaves a backlog that
    the servers fold for minutes after the load (a question reads what waits, raw: right,
    but slower), and the SQLite store folds all of its own on close: the questions compare
    the two stores in the same state, every event in the rollups."""
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT count(*) FROM unfolded").fetchone()
            waiting = int(row[0]) if row else 0
            if not waiting:
                break
            log(f"postgresql: {waiting:,} events wait for their fold")
            time.sleep(5)
    log(f"postgresql: every event folded, {time.perf_counter() - t0:.1f} s after the restart")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pgreads", description=__doc__)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--runs", type=int, default=9, help="warm runs per request and store")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trace", action="store_true", help="list each request's statements")
    p.add_argument("--explain", action="store_true", help="with --trace: each question's plan")
    p.add_argument("--only", help="requests whose name contains this")
    p.add_argument(
        "--against-round-7",
        action="store_true",
        help="then, in process: each request with round 7's PostgreSQL statements and now's",
    )
    args = p.parse_args(argv)
    anchor = time.gmtime()
    day = dt.date(anchor.tm_year, anchor.tm_mon, anchor.tm_mday)
    start_ms = g.window_start_ms(day)
    cluster = StoreCluster()
    servers = {"sqlite": Service(), "postgresql": Service(store=cluster.url)}
    try:
        accounts = [g.account_id(a) for a in range(g.ACCOUNTS)]
        keys = [
            (a, g.key_id(i, k)) for i, a in enumerate(accounts) for k in range(g.KEYS_PER_ACCOUNT)
        ]
        for name, s in servers.items():
            s.start()
            s.create([*accounts, SINGLE_ACCOUNT], keys)
            t0 = time.perf_counter()
            for piece in g.iter_events(args.seed, 0, args.events):
                res = s.post_events(render.json_batches(piece, start_ms, 1000), 4)
                if res.errors:
                    raise RuntimeError(res.errors[0])
            log(f"{name}: {args.events:,} events in {time.perf_counter() - t0:.1f} s")
            s.restart()  # as bench.run: questions of a fresh process
        wait_folded(cluster.url)
        counts = g.all_events(args.seed, args.events).account
        ranked = np.argsort(-np.bincount(counts, minlength=g.ACCOUNTS), kind="stable")
        typical = int(ranked[TYPICAL_RANK - 1])
        requests = [
            *requests_for(day, 0, "heavy", None),
            *requests_for(day, typical, "typical", None),
        ]
        if args.only:
            requests = [r for r in requests if args.only in r[0]]
        if args.runs:
            compare(servers, requests, args.runs)
        if args.trace or args.against_round_7:
            servers["postgresql"].stop()
        if args.trace:
            trace(cluster.url, servers["postgresql"].secret, requests, args.explain)
        if args.against_round_7:
            against_round_7(cluster.url, servers["postgresql"].secret, requests, args.runs or 9)
    finally:
        for s in servers.values():
            s.close()
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
