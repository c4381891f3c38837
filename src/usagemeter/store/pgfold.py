"""Folding for the PostgreSQL store: events wait in ``unfolded`` until a fold moves a long run
of them into the rollups, in one transaction.

Why: when each batch upserted the rollups itself, batches of two processes all updated the
same rows (the busy accounts' current hour and day) and each waited on the other's row locks
until its commit (bench/two_servers.py: 1.7 backends waiting against 1.3 running). A batch
now only inserts, so no writer waits for another; the fold updates each hot row once per run
instead of once per batch.

One fold at a time across every process (a transaction-level advisory lock; a process that
finds it taken leaves the work to the holder). The fold deletes what it moves and adds it to
the rollups in the same statement, so a query's snapshot has each event either still in
``unfolded`` or in the rollups, never both and never neither (docs/scaling.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool

from usagemeter.store.pgschema import FOLD_LOCK, ROLLUPS, floor_div, fold_into, fold_values
from usagemeter.store.sqlplan import HOUR_MS

log = logging.getLogger("usagemeter")

# Every waiting event into every rollup; the number moved. ``seq`` tells the later of two
# events with the same timestamp, as in a batch its position did.
FOLD_SQL = (
    "WITH moved AS (DELETE FROM unfolded RETURNING *)"
    + "".join(f", {table} AS ({fold_into(table, 'moved', 'seq')})" for table in ROLLUPS)
    + f", rollup_values AS ({fold_values('moved', floor_div('ts', HOUR_MS))})"
    + " SELECT count(*) FROM moved"
)
# A fold waits this long after the previous one, so that a run gathers many batches and
# updates each busy row once for all of them. (bench/two_servers.py --live 10, two servers:
# 0.1 s gave 9,886 and 10,627 events per CPU second, 0.5 s 12,690; the load moved between.)
FOLD_INTERVAL = 0.5
# With no batch of its own to wake it, a process folds this often: what another process
# left (one killed before it folded its last batches).
IDLE_FOLD_SECONDS = 1.0


def fold(conn: psycopg.Connection[tuple[Any, ...]], wait: bool = False) -> int | None:
    """Move every waiting event into the rollups; how many, or None when another fold or
    correction holds the lock and ``wait`` is false (that one will see them, or the next)."""
    with conn.transaction():
        if wait:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FOLD_LOCK,))
        else:
            row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (FOLD_LOCK,)).fetchone()
            if row is None or not row[0]:
                return None
        moved = conn.execute(FOLD_SQL, prepare=True).fetchone()
    count = int(moved[0]) if moved else 0
    if count and not conn.info.transaction_status:  # not inside a caller's transaction
        # The rows just moved stay in the table and its index, dead, until a vacuum; a
        # question reading the waiting events of a range would visit them all (2,000
        # waiting behind 200,000 folded: 79 ms instead of 0.1). Autovacuum looks once a
        # minute; this is at most once per fold, and skipped if another process vacuums.
        conn.execute("VACUUM (SKIP_LOCKED) unfolded")
    return count


class Folder:
    """Runs ``work`` in a thread of its own: at most every FOLD_INTERVAL while ``wake`` is
    called (after each batch), and every IDLE_FOLD_SECONDS anyway. A failure is logged, not
    raised: the events wait, and queries read them where they are."""

    def __init__(self, work: Callable[[], object]) -> None:
        self._work = work
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usagemeter-fold", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wanted.set()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread, waiting at most ``timeout`` seconds for a fold in progress (a
        database gone makes it wait for a connection; the thread is a daemon)."""
        self._stopping.set()
        self._wanted.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wanted.wait(IDLE_FOLD_SECONDS)
            if self._stopping.is_set():
                return
            self._wanted.clear()
            try:
                self._work()
            except psycopg_pool.PoolClosed:
                return  # the store closed while this fold waited for a connection
            except psycopg.OperationalError as exc:
                # The database down or restarting: an operator's condition, not a bug, so
                # one line a try rather than a traceback a second. The events wait.
                log.warning("folding the PostgreSQL rollups failed, retrying: %s", exc)
            except Exception:
                log.exception("folding the PostgreSQL rollups failed; retrying")
            if self._stopping.wait(FOLD_INTERVAL):
                return
