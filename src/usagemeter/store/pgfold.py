"""Folding for the PostgreSQL store: events wait in ``unfolded`` until a fold moves a long run
of them into the rollups, in one transaction.

Why: when each batch upserted the rollups itself, batches of two processes all updated the
same rows (the busy accounts' current hour and day) and each waited on the other's row locks
until its commit (bench/two_servers.py: 1.7 backends waiting against 1.3 running). A batch
now only inserts, so no writer waits for another; the fold updates each hot row once per run
instead of once per batch.

The accounts are split into FOLD_SHARDS shards, and one fold at a time per shard across every
process (transaction-level advisory locks; a process that finds a shard taken leaves it to
the holder and folds the others), so processes fold side by side. A correction holds the fold
lock alone and waits for the folds in progress. A fold deletes what it moves and adds it to
the rollups in the same transaction, so a query's snapshot has each event either still in
``unfolded`` or in the rollups, never both and never neither (docs/scaling.md).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool

from usagemeter.store.pgschema import (
    FOLD_LOCK,
    FOLD_SHARD_LOCK,
    ROLLUPS,
    floor_div,
    fold_into,
    fold_values,
)
from usagemeter.store.sqlplan import HOUR_MS

log = logging.getLogger("usagemeter")


def _fold_sql(where: str) -> str:
    """The waiting events that ``where`` selects into every rollup; the number moved. ``seq``
    tells the later of two events with the same timestamp, as in a batch its position did."""
    return (
        f"WITH moved AS (DELETE FROM unfolded {where} RETURNING *)"
        + "".join(f", {table} AS ({fold_into(table, 'moved', 'seq')})" for table in ROLLUPS)
        + f", rollup_values AS ({fold_values('moved', floor_div('ts', HOUR_MS))})"
        + " SELECT count(*) FROM moved"
    )


# Every waiting event: what a correction folds first, and a fold that waits for the others.
FOLD_SQL = _fold_sql("")
# The waiting events of one shard of the accounts. Every rollup row belongs to one account,
# so folds of two shards never touch the same row, and run side by side: one fold at a time
# across every process made folding one core's work however many servers ingest (two
# servers left 111,000 events waiting when the load ended, folded by one core while the
# other idled; bench/two_servers.py).
FOLD_SHARDS = 4
# Its own generator: a folder thread drawing from the global one would change its state
# under any code that seeds it (Hypothesis checks that a test's strategies do not).
_SHARD_ORDER = random.Random()
SHARD_FOLD_SQL = _fold_sql(f"WHERE mod(account, {FOLD_SHARDS}) = %s")
# A fold waits this long after the previous one, so that a run gathers many batches and
# updates each busy row once for all of them. (bench/two_servers.py --live 10, two servers:
# 0.1 s gave 9,886 and 10,627 events per CPU second, 0.5 s 12,690; the load moved between.)
FOLD_INTERVAL = 0.5
# With no batch of its own to wake it, a process folds this often: what another process
# left (one killed before it folded its last batches).
IDLE_FOLD_SECONDS = 1.0


def fold(conn: psycopg.Connection[tuple[Any, ...]], wait: bool = False) -> int | None:
    """Move the waiting events into the rollups; how many, or None when ``wait`` is false
    and other folds or a correction hold every shard (they will see them, or the next).

    Without ``wait``, each shard of the accounts not being folded by another process, one
    transaction each, sharing FOLD_LOCK with the other folds; with it, everything at once,
    holding FOLD_LOCK alone, as a correction does (it waits for the folds in progress)."""
    if wait:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FOLD_LOCK,))
            row = conn.execute(FOLD_SQL, prepare=True).fetchone()
        count: int | None = int(row[0]) if row else 0
    else:
        count = None
        first = _SHARD_ORDER.randrange(FOLD_SHARDS)  # processes folding at once start apart
        for n in range(FOLD_SHARDS):
            shard = (first + n) % FOLD_SHARDS
            with conn.transaction():
                locked = conn.execute(
                    "SELECT pg_try_advisory_xact_lock_shared(%s) AND pg_try_advisory_xact_lock(%s)",
                    (FOLD_LOCK, FOLD_SHARD_LOCK + shard),
                ).fetchone()
                if not locked or not locked[0]:
                    continue
                row = conn.execute(SHARD_FOLD_SQL, (shard,), prepare=True).fetchone()
            count = (count or 0) + (int(row[0]) if row else 0)
    if count and not conn.info.transaction_status:  # not inside a caller's transaction
        # The rows just moved stay in the table and its index, dead, until a vacuum; a
        # question reading the waiting events of a range would visit them all (2,000
        # waiting behind 200,000 folded: 79 ms instead of 0.1). Autovacuum looks once a
        # minute; this is at most once per fold, and skipped if another process vacuums.
        # Not truncating the emptied pages: batches fill them again within the second, and
        # truncating asks for a lock every batch's insert conflicts with, which the vacuum
        # waited for up to 5 s while this folder stood still (two servers: 0.04 to 0.07
        # backends waiting on it on average, bench/two_servers.py's Timeout:VacuumTruncate).
        conn.execute("VACUUM (SKIP_LOCKED, TRUNCATE false) unfolded")
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
