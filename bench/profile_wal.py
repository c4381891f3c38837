"""What a backfill writes into the WAL, table by table: `python -m bench.profile_wal STORE`.

Copies STORE (a SQLite store made by `bench.run --full`, say; only read), then, in process,
appends the bench's events (120 days, 1,000 accounts) by batches of 1,000, ``--clients`` at a
time (so that group commit gathers them as the server's would), with the committer's own
folds held back; then folds them in one run (or, with ``--fold-every N``, each time N events
wait, as the committer does past its ``FOLD_EVENTS``). The WAL is read after the appends and
after each fold (checkpoints held back meanwhile): each frame names a page, and the store's
pages are named by ``dbstat``. Printed: the frames an event's commits and its folds wrote,
per table or index, per 1,000 events, and the process's CPU an event in each. Each frame is
a page of 4 kB written to the WAL and synced, then copied into the file by a checkpoint: the
disk's work an event costs, and much of the COMMIT's CPU.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sqlite3
import struct
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import generate as g
from bench import render
from bench.ingest import IngestBench
from bench.ingest import parse_args as ingest_args
from usagemeter.ingest import Ingestor
from usagemeter.store import sqlite as sqlite_store

WAL_HEADER, FRAME_HEADER = 32, 24


def frames(wal: Path, page_size: int, start: int = 0) -> list[int]:
    """The page number of each frame of the WAL file ``wal`` from frame ``start``, in order
    (each frame's header read alone: the WAL of a long run is gigabytes)."""
    pages = []
    with wal.open("rb") as f:
        at = WAL_HEADER + start * (FRAME_HEADER + page_size)
        size = f.seek(0, 2)
        while at + FRAME_HEADER + page_size <= size:
            f.seek(at)
            pages.append(struct.unpack(">I", f.read(4))[0])
            at += FRAME_HEADER + page_size
    return pages


def owners(conn: sqlite3.Connection) -> dict[int, str]:
    """The table or index each page of the file belongs to now."""
    return {int(page): str(name) for page, name in conn.execute("SELECT pageno, name FROM dbstat")}


def report(label: str, counts: collections.Counter[str], events: int) -> None:
    total = sum(counts.values())
    print(f"{label}: {total:,} frames, {total * 1000 / events:,.0f} per 1,000 events")
    for name, count in counts.most_common(12):
        print(f"    {name:32} {count * 1000 / events:8.1f}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("store", type=Path, help="a SQLite store to copy (only read)")
    p.add_argument("--events", type=int, default=200_000, help="events appended, then folded")
    p.add_argument("--clients", type=int, default=4, help="batches of 1,000 sent together")
    p.add_argument("--first", type=int, default=20_000_000, help="the first event's number")
    p.add_argument(
        "--fold-every",
        type=int,
        default=0,
        help="fold each time this many events wait, as the committer does past FOLD_EVENTS"
        " (default: one fold after all the appends)",
    )
    a = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="profile-wal-"))
    work = root / "usagemeter.db"
    try:
        shutil.copyfile(a.store, work)
        # The folds of a pause and of a full run held back: the appends' frames alone first.
        sqlite_store.IDLE_FOLD_SECONDS = 3600.0
        sqlite_store.FOLD_EVENTS = 10**12
        sqlite_store.MERGE_EVENTS = 10**12
        store = sqlite_store.SQLiteStore(work)
        start_ms = IngestBench(ingest_args([])).start_ms
        events = g.concat(list(g.iter_events(1, a.first, a.first + a.events)))
        bodies = list(render.json_batches(events, start_ms, 1000))
        ingestor = Ingestor(store)
        with store._write_lock:
            store._writer.execute("PRAGMA wal_autocheckpoint=0")
            store._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        wal = Path(f"{work}-wal")
        conn = sqlite3.connect(f"file:{work}?mode=ro", uri=True)
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        # Each frame named as its page is right after the commits or the fold that wrote it:
        # a fold empties the waiting events' pages (free then) and its tables may take them.
        named: dict[str, collections.Counter[str]] = {
            "the commits": collections.Counter(),
            "the fold": collections.Counter(),
        }
        cpu = {"the commits": 0.0, "the fold": 0.0}

        def count(label: str, start: int) -> int:
            written = frames(wal, page_size, start)
            owner = owners(conn)
            named[label].update(owner.get(page, "(a free page)") for page in written)
            return start + len(written)

        def fold() -> None:
            started = time.process_time()
            store.fold()
            cpu["the fold"] += time.process_time() - started

        waiting = at = 0
        with ThreadPoolExecutor(a.clients) as pool:
            for n in range(0, len(bodies), a.clients):
                together = bodies[n : n + a.clients]
                started = time.process_time()
                list(pool.map(lambda body: ingestor.ingest_json(body, False, None), together))
                cpu["the commits"] += time.process_time() - started
                waiting += sum(body.count(b'{"id":') for body in together)
                if a.fold_every and waiting >= a.fold_every:
                    at = count("the commits", at)
                    fold()
                    at, waiting = count("the fold", at), 0
        at = count("the commits", at)
        fold()
        count("the fold", at)
        conn.close()
        store.close()
        for label, seconds in cpu.items():
            print(f"{label}: {seconds * 1e6 / a.events:.1f} µs of CPU an event (process)")
        for label, counts in named.items():
            report(label, counts, a.events)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
