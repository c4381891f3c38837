"""Alerts at run time: notice the batches that may cross a limit's threshold, record the
crossings, and hand them to the webhook worker.

Why no outbox in the events' transaction: crossings are decided by the engine over committed
usage, after the commit, off the request thread. Durability comes from the other end:

1. A batch is committed (and acknowledged) first. The ingest thread only looks up, in memory,
   whether any limit watches one of the batch's metrics, and queues (account, metric,
   timestamps) for this module's thread: a batch of metrics without limits costs one dict
   lookup per event.
2. The thread evaluates each limit the batch touches in every period its events fall in
   (a late event is judged in its own period) and records each threshold reached as a
   crossing, with its deliveries, in one transaction. The crossing's key (limit, period,
   threshold) makes it fire once, whoever evaluates it and however often.
3. If the process dies between 1 and 2, the queue is lost but nothing else: on start,
   ``reconcile`` evaluates every limit in its current and previous period, and records what
   the lost queue would have. Pending deliveries are rows; the worker resumes them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from usagemeter.engine import Engine
from usagemeter.limitmodel import Limit
from usagemeter.limits import periods_touched, previous_instant, record_crossings
from usagemeter.model import AppendResult, Event
from usagemeter.store.base import NotFound, Store
from usagemeter.webhooks import Dispatcher, RetryPolicy

log = logging.getLogger("usagemeter")
REFRESH_S = 5.0  # how often the limits are read again (another process may have changed them)
# How often every limit is evaluated anyway: events this process did not see (another
# process on the same PostgreSQL database, `usagemeter ingest` beside a running server) cross
# thresholds too.
RECONCILE_S = 60.0

Touched = dict[tuple[str, str], list[int]]  # (account, metric) -> event timestamps


class Alerts:
    """The watcher thread and the webhook worker of one process."""

    def __init__(
        self,
        store: Store,
        engine: Engine,
        now: Callable[[], datetime],
        policy: RetryPolicy | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.store = store
        self.engine = engine
        self.now = now
        self.dispatcher = Dispatcher(store, policy or RetryPolicy(), poll_s)
        self._queue: queue.Queue[Touched | None] = queue.Queue()
        self._by_metric: dict[str, list[Limit]] = {}
        self._refreshed = 0.0
        self._reconciled = 0.0
        self._thread: threading.Thread | None = None
        self._read_upto: int | None = None  # where this process's last read of the log ended

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.refresh()
        try:
            self.read_log()
            self.reconcile()
        except Exception:
            log.exception("reconciling limits at start failed; alerts go on")
        self.dispatcher.start()
        self._thread = threading.Thread(target=self._run, name="limits", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.dispatcher.stop()

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """True once every queued batch has been evaluated (for tests and shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # ---------------------------------------------------------------- limits

    def refresh(self) -> None:
        """Read the limits again; call after changing one."""
        by_metric: dict[str, list[Limit]] = {}
        for limit in self.store.list_limits():
            by_metric.setdefault(limit.metric, []).append(limit)
        self._by_metric = by_metric
        self._refreshed = time.monotonic()

    def after_append(self, events: Sequence[Event], result: AppendResult, seconds: float) -> None:
        """The ingest path's hook, after a commit: queue what may cross a threshold."""
        watched = self._by_metric
        if not watched:
            return
        try:
            touched: Touched = {}
            for event in events:
                if event.metric in watched:
                    touched.setdefault((event.account_id, event.metric), []).append(event.ts_ms)
            if touched:
                self._queue.put(touched)
        except Exception:  # the batch is stored: its answer must not become an error
            log.exception("queueing a batch for limits failed; the reconcile will see it")

    def reconcile(self) -> int:
        """Evaluate every limit in its current and previous period; the crossings recorded."""
        self._reconciled = time.monotonic()
        now = self.now()
        fired = 0
        for limit in self.store.list_limits():
            account = self.store.get_account(limit.account_id)
            for at in (now, previous_instant(limit, account, now)):
                fired += len(record_crossings(self.engine, self.store, limit, at, now))
        if fired:
            self.dispatcher.wake()
        return fired

    def read_log(self) -> None:
        """Evaluate what the event log holds past the stored cursor: the durable path, as
        the events' own transaction wrote it (the in-memory queue only makes alerts fast).
        A crash between an event's commit and its evaluation is caught up here on the next
        start, whatever period the event fell in.

        The cursor moves to where this process's *previous* read ended, not this one: on
        PostgreSQL and ClickHouse an event numbered below the newest visible one may still
        be committing, so each read looks again at the stretch the last one read (a
        crossing is recorded once, so reading twice costs a query, never a second alert).
        Only a write still uncommitted a whole read interval after it was numbered could be
        missed by this path."""
        high = self.store.last_seq()
        cursor = self.store.alert_cursor()
        if cursor is None:
            # The first start with alerts: the log before it is history, which the
            # reconcile of current and previous periods covers.
            self.store.advance_alert_cursor(high)
            self._read_upto = high
            return
        watched = sorted(self._by_metric)
        touched: Touched = {}
        if watched and high > cursor:
            for account, metric, first, last in self.store.touched(cursor, high, watched):
                touched.setdefault((account, metric), []).extend((first, last))
        self._evaluate(touched)
        if self._read_upto is not None:
            self.store.advance_alert_cursor(self._read_upto)
        self._read_upto = high

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=REFRESH_S)
            except queue.Empty:
                self._idle()
                continue
            # Everything queued meanwhile is evaluated together: under a stream of batches,
            # one engine query per limit and period answers many of them.
            items = [item]
            while item is not None:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
            try:
                if time.monotonic() - self._refreshed > REFRESH_S:
                    self.refresh()
                merged: Touched = {}
                for touched in items:
                    for pair, timestamps in (touched or {}).items():
                        merged.setdefault(pair, []).extend(timestamps)
                self._evaluate(merged)
            except Exception:
                log.exception("evaluating limits failed; the next start reconciles them")
            finally:
                for _ in items:
                    self._queue.task_done()
            if None in items:
                return

    def _idle(self) -> None:
        try:
            self.refresh()
            if time.monotonic() - self._reconciled > RECONCILE_S:
                self.read_log()
                self.reconcile()
        except Exception:
            log.exception("reconciling limits failed; trying again later")

    def _evaluate(self, touched: Touched) -> None:
        fired = 0
        now = self.now()
        for (account_id, metric), timestamps in touched.items():
            try:
                owners = set(self.store.ancestors(account_id))
            except NotFound:
                continue
            for limit in self._by_metric.get(metric, []):
                if limit.account_id != account_id and not (
                    limit.include_subaccounts and limit.account_id in owners
                ):
                    continue
                account = self.store.get_account(limit.account_id)
                for at in periods_touched(limit, account, timestamps):
                    fired += len(record_crossings(self.engine, self.store, limit, at, now))
        if fired:
            self.dispatcher.wake()
