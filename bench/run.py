"""Run every benchmark and write the table: `python -m bench.run [--events N | --full]`.

Our service, a hand-rolled PostgreSQL and ClickHouse (chDB) get the same events and answer the
same questions; every answer must equal ours, or the run fails. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import generate as g
from bench import questions as qs
from bench import reference, render, report
from bench.ours import Service
from bench.questions import Question
from bench.results import OURS, Results, Row, ScalePoint, SeedRow
from bench.seeds import seed_requests
from bench.timing import measure

HERE = Path(__file__).resolve().parent
TYPICAL_RANK = 500  # the median account by volume
SINGLE_ACCOUNT = "acct_single"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--events", type=int, default=1_000_000, help="events stored (default 1M)")
    p.add_argument("--full", action="store_true", help="the issue's run: 10M events")
    p.add_argument(
        "--scale",
        type=str,
        default=None,
        help="comma-separated sizes for the scale query (default: events/10 and events)",
    )
    p.add_argument("--scale-100m", action="store_true", help="also measure at 100M events")
    p.add_argument("--seed", type=int, default=1, help="data generator seed (default 1)")
    p.add_argument("--anchor", type=dt.date.fromisoformat, help="data window end, YYYY-MM-DD")
    p.add_argument("--runs", type=int, default=7, help="warm runs per figure (default 7)")
    p.add_argument("--batch", type=int, default=1000, help="events per ingest request")
    p.add_argument("--clients", type=int, default=4, help="concurrent batch ingest clients")
    p.add_argument(
        "--single", type=int, help="single-event requests (default events/50, 2,000 to 20,000)"
    )
    p.add_argument("--single-clients", type=int, default=8, help="concurrent single clients")
    p.add_argument(
        "--check-accounts",
        type=int,
        default=100,
        help="accounts whose stored counts are checked per metric after ingest (0: all)",
    )
    p.add_argument("--no-peers", action="store_true", help="only our service")
    p.add_argument(
        "--store",
        choices=["sqlite", "postgresql", "chdb"],
        default="sqlite",
        help="our store: SQLite (default), PostgreSQL on a durable cluster the bench starts,"
        " or ClickHouse in the server's process (chDB)",
    )
    p.add_argument(
        "--ingest-only",
        action="store_true",
        help="only the ingest workloads against a bare-SQLite floor (python -m bench.ingest -h)",
    )
    p.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="markdown table")
    p.add_argument("--keep", action="store_true", help="keep our database directory")
    args = p.parse_args(argv)
    if args.full:
        args.events = 10_000_000
    if args.single is None:
        args.single = min(20_000, max(2_000, args.events // 50))
    if args.scale:
        args.sizes = sorted({int(s.replace("_", "")) for s in args.scale.split(",")})
    else:
        args.sizes = sorted({max(args.events // 10, 1), args.events})
    if args.scale_100m:
        args.sizes = sorted({*args.sizes, 100_000_000})
    args.sizes = sorted({*args.sizes, args.events})
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.anchor = args.anchor or dt.datetime.now(dt.UTC).date()
        self.start_ms = g.window_start_ms(self.anchor)
        self.results = Results(
            started=dt.datetime.now(dt.UTC),
            command=" ".join(["python -m bench.run", *sys.argv[1:]]),
            events=args.events,
            seed=args.seed,
            anchor=self.anchor,
            warm_runs=args.runs,
        )
        self.cluster = None
        if args.store == "postgresql":
            from bench.pgstore import StoreCluster

            self.cluster = StoreCluster()
        store, workdir = self.cluster.url if self.cluster else None, None
        if args.store == "chdb":  # chDB's files in the service's directory, removed with it
            workdir = Path(tempfile.mkdtemp(prefix="usagemeter-bench-"))
            store = f"chdb:///{workdir}/chdb"
        self.ours = Service(workdir, store)
        self.peers: list = []
        self.loaded = 0
        self._events: g.Events | None = None
        self.typical = 0

    def events(self) -> g.Events:
        """Everything loaded so far, as one set of arrays (for counts and the reference)."""
        if self._events is None or len(self._events) != self.loaded:
            self._events = g.all_events(self.args.seed, self.loaded)
        return self._events

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        r = self.results
        r.machine = report.machine(self.ours.root)
        r.versions = report.versions()
        for index in range((max(self.args.sizes) - 1) // g.CHUNK + 1):
            log(f"data: chunk {index} (generated once, then cached in {g.DATA_DIR})")
            g.load_chunk(self.args.seed, index)
        self.ours.start()
        accounts = [g.account_id(a) for a in range(g.ACCOUNTS)]
        keys = [
            (a, g.key_id(i, k)) for i, a in enumerate(accounts) for k in range(g.KEYS_PER_ACCOUNT)
        ]
        log(f"ours: {len(accounts)} accounts, {len(keys)} keys")
        self.ours.create([*accounts, SINGLE_ACCOUNT], keys)
        r.versions[OURS] = self.ours.version + (
            f" on PostgreSQL {self.cluster.version}"
            if self.cluster
            else " on chDB"
            if self.args.store == "chdb"
            else " on SQLite"
        )
        if not self.args.no_peers:
            from bench.peers.chdb_peer import ChdbPeer
            from bench.peers.postgres import PostgresPeer

            log("peers: starting PostgreSQL and chDB")
            for make in (PostgresPeer, ChdbPeer):
                peer = make()
                self.peers.append(peer)  # appended at once, so close() stops it whatever happens
                r.versions[peer.name] = peer.version
                r.systems.append(peer.name)

    def close(self) -> None:
        self.ours.close(keep=self.args.keep)
        if self.cluster is not None:
            self.cluster.close()
        for peer in self.peers:
            peer.close()

    # ------------------------------------------------------------------ load

    def load_to(self, size: int) -> None:
        ing = self.results.ingest
        ing.batch_size, ing.batch_clients = self.args.batch, self.args.clients
        for piece in g.iter_events(self.args.seed, self.loaded, size):
            bodies = render.json_batches(piece, self.start_ms, self.args.batch)
            res = self.ours.post_events(bodies, self.args.clients)
            if res.errors:
                raise RuntimeError(f"POST /v1/events failed: {res.errors[0]}")
            ing.batch_events += res.accepted
            ing.batch_duplicates += res.duplicates
            ing.batch_seconds += res.seconds
            end = piece.first + len(piece)
            log(f"ours: {end:,} events, {res.accepted / res.seconds:,.0f} events/s in this step")
            if res.accepted + res.duplicates != len(piece) or res.duplicates:
                self.fail(
                    f"ingest: sent {len(piece)} events, accepted {res.accepted}, "
                    f"duplicates {res.duplicates}"
                )
            if self.peers:
                tsv = render.tsv(piece, self.start_ms)
                for peer in self.peers:
                    took = peer.load(tsv)
                    self.results.loads[peer.name] = self.results.loads.get(peer.name, 0.0) + took
        self.loaded = size

    def fail(self, message: str) -> None:
        log("FAIL " + message)
        self.results.failures.append(message)

    # ------------------------------------------------------------------ questions

    def ask(self, q: Question) -> Row:
        """The question of every system: timings, and each peer's answer checked against ours."""
        row = Row(q)
        timing, body = measure(lambda: self.ours.run(q), self.args.runs)
        row.timings[OURS] = timing
        ours = self.ours.answer(q, body)
        row.cells = len(ours.buckets)
        for peer in self.peers:
            timing, rows = measure(lambda p=peer: p.run(q), self.args.runs)
            row.timings[peer.name] = timing
            diff = qs.differences(ours, peer.answer(q, rows))
            if diff:
                row.mismatches[peer.name] = diff
        if row.mismatches:
            # Who is right: the answer computed straight from the events that were sent.
            truth = reference.answer(self.events(), q, self.start_ms)
            ours_wrong = qs.differences(ours, truth, limit=3)
            if ours_wrong:
                peers = ", ".join(row.mismatches)
                self.fail(
                    f"{q.label} '{q.name}': ours differs from {peers} and from the events "
                    f"sent; ours vs sent: " + "; ".join(ours_wrong)
                )
            for peer, diff in row.mismatches.items():
                if not ours_wrong:
                    self.fail(f"{q.label} '{q.name}': {peer} is wrong: " + "; ".join(diff[:3]))
        return row

    def scale_point(self) -> None:
        q = qs.headline(self.anchor)
        row = self.ask(q)
        size = self.cluster.db_bytes() if self.cluster else self.ours.db_bytes
        point = ScalePoint(self.loaded, row.timings, size)
        self.results.scale.append(point)
        med = {k: f"{t.median * 1000:.2f} ms" for k, t in row.timings.items()}
        log(f"scale {self.loaded:,}: heavy 90-day query {med}")

    def questions(self) -> None:
        counts = np.bincount(self.events().account, minlength=g.ACCOUNTS)
        self.typical = int(np.argsort(-counts, kind="stable")[TYPICAL_RANK - 1])
        for label, account in (("heavy", 0), ("typical", self.typical)):
            self.results.accounts[label] = (g.account_id(account), int(counts[account]))
            for q in qs.question_set(self.anchor, account, label):
                row = self.ask(q)
                self.results.rows.append(row)
                med = {k: f"{t.median * 1000:.2f}" for k, t in row.timings.items()}
                log(f"{label} {q.name}: {med} ms")
            self.seed_endpoints(label, account)

    def seed_endpoints(self, label: str, account: int) -> None:
        key = g.key_id(account, 0)
        for req in seed_requests(self.ours.secret, g.account_id(account), key, self.anchor):
            row = SeedRow(req.name, label)
            first = self.ours.get(req.path, req.headers)
            row.status = first.status_code
            if first.status_code == 404:
                # Seed endpoints arrive one by one; a missing one is noted, not a failure.
                row.note = "skipped: 404 for this path (not served yet?)"
            elif first.status_code != 200:
                row.note = f"{first.status_code}: {first.text[:120]}"
                self.fail(f"seed {req.name} for {label}: {first.status_code} {first.text[:300]}")
            else:
                row.timing, _ = measure(
                    lambda r=req: self.ours.get(r.path, r.headers), self.args.runs
                )
            self.results.seeds.append(row)

    # ------------------------------------------------------------------ ingest checks

    def single_events(self) -> None:
        """Single-event requests into their own account, so the questions' data is untouched."""
        ing = self.results.ingest
        ing.single_clients = self.args.single_clients
        n = self.args.single
        ts = self.start_ms + g.DAYS * g.DAY_MS - 3_600_000
        bodies = [
            (
                f'[{{"id":"single-{i}","account":"{SINGLE_ACCOUNT}","metric":"requests",'
                f'"ts":{ts + i},"dimensions":{{"status":"200"}}}}]'
            ).encode()
            for i in range(n)
        ]
        res = self.ours.post_events(bodies, self.args.single_clients, max_seconds=10)
        if res.errors:
            self.fail(f"single-event ingest: {res.errors[0]}")
        ing.single_requests, ing.single_seconds = res.requests, res.seconds
        ing.single_accepted = res.accepted
        log(f"ours: single events, {ing.single_rate:,.0f} requests/s")

    def check_stored(self) -> None:
        """Every (account, metric) total over the window equals the events sent."""
        ing = self.results.ingest
        events = self.events()
        expected = np.bincount(
            events.account.astype(np.int64) * len(g.METRICS) + events.metric,
            minlength=g.ACCOUNTS * len(g.METRICS),
        )
        start = dt.datetime.fromtimestamp(self.start_ms / 1000, dt.UTC)
        end = start + dt.timedelta(days=g.DAYS)
        window = {"start": _iso(start), "end": _iso(end), "granularity": "total"}
        n = self.args.check_accounts or g.ACCOUNTS
        accounts = sorted({*range(0, g.ACCOUNTS, max(g.ACCOUNTS // n, 1)), self.typical})
        params = [
            {"metric": m, "account": g.account_id(a), "aggregation": "count", **window}
            for a in accounts
            for m in g.METRICS
        ]
        single = {"metric": "requests", "account": SINGLE_ACCOUNT, "aggregation": "count"}
        got = self.ours.counts([*params, {**single, **window, "end": _iso(end + dt.timedelta(1))}])
        ing.single_stored = got.pop()
        ing.stored_checked = len(params)
        want_counts = [
            int(expected[a * len(g.METRICS) + i]) for a in accounts for i in range(len(g.METRICS))
        ]
        for p, want, have in zip(params, want_counts, got, strict=True):
            if want != have:
                ing.stored_wrong.append(f"{p['account']} {p['metric']}: sent {want}, stored {have}")
        if ing.stored_wrong:
            self.fail("events stored != sent: " + "; ".join(ing.stored_wrong[:5]))
        if ing.single_stored != ing.single_accepted:
            self.fail(f"single events: {ing.single_accepted} accepted, {ing.single_stored} stored")
        log(f"ours: stored counts checked ({len(params)} totals)")

    # ------------------------------------------------------------------ the run

    def run(self) -> Results:
        t0 = time.perf_counter()
        r = self.results
        try:
            self.setup()
            for size in self.args.sizes:
                self.load_to(size)
                if size == self.args.events:
                    self.single_events()
                r.memory["ingest"] = max(r.memory.get("ingest", 0), self.ours.restart())
                for peer in self.peers:
                    peer.restart()
                self.scale_point()
                if size == self.args.events:
                    self.questions()
                    self.check_stored()
                    r.memory["queries"] = self.ours.restart()
            r.memory["queries"] = max(r.memory.get("queries", 0), self.ours.stop())
        finally:
            self.close()
        r.machine["load_after"] = report.load_average()
        r.seconds = time.perf_counter() - t0
        return r


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--ingest-only" in argv:
        # Minutes, not an hour: each ingest workload against the bare-SQLite floor.
        from bench import ingest

        return ingest.main([a for a in argv if a != "--ingest-only"])
    args = parse_args(argv)
    results = Bench(args).run()
    text = report.render(results)
    print(text)
    args.output.write_text(text)
    log(f"written to {args.output}")
    if results.failures:
        log(f"{len(results.failures)} failure(s): answers or counts differ (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
