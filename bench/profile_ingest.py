"""Where a batch's time goes on the write path: `python -m bench.profile_ingest`.

Times each statement of the writer connection for batches of 1,000 events, on a store that
already holds 200k, once with timestamps spread over 120 days and 1,000 Zipf accounts (the
bench's data: a backfill) and once in time order (live traffic), each a run of 200 batches
that ends with its fold (the store folds runs of ``FOLD_EVENTS``, 200,000), so that the
rollup writes are those of one run, shared out per event, each rollup table apart. What is
left of an event's time is Python: decoding, validating, building the rows.
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from usagemeter.ingest import Ingestor
from usagemeter.model import Account
from usagemeter.store.sqlite import SQLiteStore

BASE_MS = 1_735_689_600_000
DAY_MS = 86_400_000


class TimedConnection:
    """The writer connection, with the time of each kind of statement added up."""

    def __init__(self, conn: sqlite3.Connection, timings: dict[str, float]) -> None:
        self.conn = conn
        self.timings = timings

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def _add(self, kind: str, started: float) -> None:
        self.timings[kind] = self.timings.get(kind, 0.0) + time.perf_counter() - started

    def execute(self, sql: str, *args: Any) -> Any:
        started = time.perf_counter()
        result = self.conn.execute(sql, *args)
        kind = "COMMIT: WAL write + fsync" if sql.startswith("COMMIT") else "other statements"
        if sql.startswith("INSERT INTO events"):  # rows go in by statements of many
            kind = "write events"
        elif sql.startswith("INSERT INTO unfolded"):
            kind = "copy into unfolded"
        elif sql.startswith("DELETE FROM unfolded"):
            kind = "fold: empty unfolded"
        elif sql.startswith("INSERT INTO event_times"):
            kind = "fold: event_times"
        elif sql.startswith("INSERT INTO rollup"):
            kind = "fold: " + sql.split()[2]
        elif sql.startswith("INSERT INTO temp.fold_key_hours"):
            kind = "fold: the run's key hours"
        elif sql.startswith("INSERT INTO temp.fold_hours"):
            kind = "fold: the run's hours"
        self._add("dedupe lookup" if "JOIN events e" in sql else kind, started)
        return result

    def executemany(self, sql: str, *args: Any) -> Any:
        started = time.perf_counter()
        result = self.conn.executemany(sql, *args)
        self._add("write " + sql.split()[2], started)
        return result


def main() -> None:
    rng = random.Random(1)
    counter = iter(range(10**9))

    def body(ordered: bool) -> bytes:
        events = []
        for _ in range(1000):
            n = next(counter)
            account = min(999, int(rng.paretovariate(1.0)) - 1)
            ts = BASE_MS + (n * 10_000 if ordered else rng.randrange(120 * DAY_MS))
            events.append(
                {
                    "id": f"e{n}",
                    "account": f"a{account}",
                    "metric": rng.choice(["lookups", "requests", "actions", "ApiCalls"]),
                    "ts": ts,
                    "dimensions": {"status": rng.choice(["200", "404"])},
                    "tags": rng.sample(["a", "b", "c"], rng.randrange(3)),
                }
            )
        return msgspec.json.encode(events)

    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "profile.db")
        for a in range(1000):
            store.create_account(Account(f"a{a}", f"Account {a}"))
        ingestor = Ingestor(store)
        for _ in range(200):
            ingestor.ingest_json(body(False), False, None)
        store.fold()  # the stored events all folded before the timed runs
        timings: dict[str, float] = {}
        store._writer = TimedConnection(store._writer, timings)  # type: ignore[assignment]
        for label, ordered in (("spread over 120 days", False), ("in time order", True)):
            timings.clear()
            bodies = [body(ordered) for _ in range(200)]
            events = 1000 * len(bodies)
            started = time.perf_counter()
            for b in bodies:
                ingestor.ingest_json(b, False, None)
            store.fold()
            per_event = (time.perf_counter() - started) / events * 1e6
            print(f"\n{label}: {per_event:.1f} µs an event = {1e6 / per_event:,.0f} events/s")
            for kind, seconds in sorted(timings.items(), key=lambda kv: -kv[1]):
                print(f"  {kind:32} {seconds * 1e6 / events:6.2f} µs")
            python = per_event - sum(timings.values()) * 1e6 / events
            print(f"  {'Python: decode, validate, rows':32} {python:6.2f} µs")
        store.close()


if __name__ == "__main__":
    main()
