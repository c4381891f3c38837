"""What a backfill writes into the WAL, table by table: `python -m bench.profile_wal STORE`.

Copies STORE (a SQLite store made by `bench.run --full`, say; only read), then, in process,
appends the bench's events (120 days, 1,000 accounts) by batches of 1,000, ``--clients`` at a
time (so that group commit gathers them as the server's would), with the committer's own
folds held back; then folds them in one run. The WAL is read after the appends and again
after the fold (checkpoints held back meanwhile): each frame names a page, and the store's
pages are named by ``dbstat``. Printed: the frames an event's commit and its fold wrote, per
table or index, per 1,000 events. Each frame is a page of 4 kB written to the WAL and synced,
then copied into the file by a checkpoint: the disk's work an event costs, and much of the
COMMIT's CPU.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sqlite3
import struct
import tempfile
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


def frames(wal: Path, page_size: int) -> list[int]:
    """The page number of each frame of the WAL file ``wal``, in order."""
    data = wal.read_bytes()
    pages = []
    at = WAL_HEADER
    while at + FRAME_HEADER + page_size <= len(data):
        pages.append(struct.unpack(">I", data[at : at + 4])[0])
        at += FRAME_HEADER + page_size
    return pages


def owners(conn: sqlite3.Connection) -> dict[int, str]:
    """The table or index each page of the file belongs to now."""
    return {int(page): str(name) for page, name in conn.execute("SELECT pageno, name FROM dbstat")}


def report(label: str, pages: Sequence[int], owner: dict[int, str], events: int) -> None:
    counts = collections.Counter(owner.get(page, "(a free page)") for page in pages)
    print(f"{label}: {len(pages):,} frames, {len(pages) * 1000 / events:,.0f} per 1,000 events")
    for name, count in counts.most_common(12):
        print(f"    {name:32} {count * 1000 / events:8.1f}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("store", type=Path, help="a SQLite store to copy (only read)")
    p.add_argument("--events", type=int, default=200_000, help="events appended, then folded")
    p.add_argument("--clients", type=int, default=4, help="batches of 1,000 sent together")
    p.add_argument("--first", type=int, default=20_000_000, help="the first event's number")
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
        with ThreadPoolExecutor(a.clients) as pool:
            for n in range(0, len(bodies), a.clients):
                together = bodies[n : n + a.clients]
                list(pool.map(lambda body: ingestor.ingest_json(body, False, None), together))
        wal = Path(f"{work}-wal")
        conn = sqlite3.connect(f"file:{work}?mode=ro", uri=True)
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        appended = frames(wal, page_size)
        report("the commits", appended, owners(conn), a.events)
        store.fold()
        folded = frames(wal, page_size)[len(appended) :]
        # Named as they are after the fold: it empties the waiting events' pages (free now)
        # and its recent tables may take them.
        report("the fold", folded, owners(conn), a.events)
        conn.close()
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
