"""What limits cost: the "may I?" check in process, and ingest with and without alerts.

    python -m bench.limits [--events 200000] [--checks 2000]

On a fresh SQLite file: one account with a year of events, a limit on its metric. The check
is timed through the library call (``limits.check``) and through the HTTP route in process
(Starlette's test client: routing, auth and JSON included). Ingest is timed as batches of
500 through the Ingestor, bare and with the alerts' hook watching the batch's metric.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from usagemeter.alerts import Alerts
from usagemeter.api.app import create_app
from usagemeter.auth import issue_key
from usagemeter.engine import Engine
from usagemeter.ingest import Ingestor
from usagemeter.limitmodel import Limit, Period
from usagemeter.limits import check
from usagemeter.model import Account, Event, Scope
from usagemeter.store.sqlite import SQLiteStore

NOW = datetime(2025, 3, 15, 12, tzinfo=UTC)
BATCH = 500


def _events(prefix: str, n: int, metric: str) -> list[Event]:
    start = NOW - timedelta(days=365)
    step = (365 * 86_400_000) // max(n, 1)
    base = int(start.timestamp() * 1000)
    return [Event(f"{prefix}{i}", "acme", metric, base + i * step) for i in range(n)]


def _ms(samples: list[float]) -> str:
    qs = statistics.quantiles(samples, n=100)
    return f"p50 {qs[49] * 1000:.3f} ms, p99 {qs[98] * 1000:.3f} ms"


def _ingest(store: SQLiteStore, ingestor: Ingestor, prefix: str, n: int, metric: str) -> float:
    events = _events(prefix, n, metric)
    started = time.perf_counter()
    for i in range(0, n, BATCH):
        ingestor._append(events[i : i + BATCH])
    return (time.perf_counter() - started) / (n / BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--checks", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "limits.db")
        store.create_account(Account("acme", "Acme"))
        secret = issue_key(store, "acme", name="k", scopes=[Scope.READ])[1]
        engine = Engine(store)
        ingestor = Ingestor(store)
        _ingest(store, ingestor, "seed", args.events, "lookups")
        limit = Limit("lim_1", "acme", "lookups", 1e12, Period.MONTH, "America/New_York")
        store.create_limit(limit)

        samples = []
        for _ in range(args.checks):
            started = time.perf_counter()
            check(engine, store, limit, NOW)
            samples.append(time.perf_counter() - started)
        print(f"check, library call ({args.events:,} events stored): {_ms(samples)}")

        with TestClient(create_app(store, now=lambda: NOW)) as client:
            headers = {"Authorization": f"Bearer {secret}"}
            samples = []
            for _ in range(args.checks):
                started = time.perf_counter()
                response = client.get("/v1/accounts/acme/limits/lookups", headers=headers)
                samples.append(time.perf_counter() - started)
                assert response.status_code == 200
            print(f"check, HTTP route in process: {_ms(samples)}")
            samples = []
            for _ in range(args.checks):
                started = time.perf_counter()
                client.get("/healthz")
                samples.append(time.perf_counter() - started)
            print(f"  beside GET /healthz through the same test client: {_ms(samples)}")

        n = min(args.events, 50_000)
        bare = _ingest(store, Ingestor(store), "bare", n, "lookups")
        alerts = Alerts(store, engine, lambda: NOW)
        alerts.start()
        watched = Ingestor(store)
        watched.after_append.append(alerts.after_append)
        hooked = _ingest(store, watched, "hooked", n, "lookups")
        unwatched = _ingest(store, watched, "other", n, "requests")
        alerts.wait_idle(600)
        alerts.stop()
        print(f"ingest, {BATCH}-event batch: bare {bare * 1000:.2f} ms,")
        print(f"  with alerts watching its metric {hooked * 1000:.2f} ms,")
        print(f"  with alerts on, its metric unwatched {unwatched * 1000:.2f} ms")
        store.close()


if __name__ == "__main__":
    main()
