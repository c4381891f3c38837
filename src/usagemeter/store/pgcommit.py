"""Group commit for the PostgreSQL store: batches that arrive together in one process are
written by one statement in one transaction.

Why: concurrent batches of one process otherwise run as concurrent transactions that upsert
the same rollup rows (an account's day, its hour), and each waits on the others' row locks
until they commit; the bench's backends spent more time waiting on each other than running
(bench/two_servers.py prints it). One statement for them all takes those locks once, shares
one commit, and folds the batches' events into each rollup row once.

Leaders and followers, as in SQLite's or PostgreSQL's own group commit: a thread whose batch
finds fewer than ``writers`` writers at work becomes one and takes what is queued; the others
wait for their outcome. When a writer is done, the oldest batch still queued (if any) is woken
to write next, so no thread writes for others for longer than one group. More than one
writer: a single one leaves the database a single backend, and the process's next batches
wait while it writes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Job(Generic[Item, Result]):
    __slots__ = ("error", "item", "lead", "result", "size", "woken")

    def __init__(self, item: Item, size: int) -> None:
        self.item = item
        self.size = size
        self.woken = threading.Event()
        self.lead = False
        self.result: Result | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[Item, Result]):
    """Runs ``write`` over groups of the items that threads ``submit`` at the same time.

    ``write`` gets the items of a group, oldest first, and returns one outcome per item: its
    result, or the exception to raise in the thread that submitted it. A group holds at most
    ``max_size`` (by the sizes given to ``submit``), or one item if that alone is larger; at
    most ``writers`` groups are written at a time."""

    def __init__(
        self,
        write: Callable[[Sequence[Item]], Sequence[Result | BaseException]],
        max_size: int,
        writers: int = 1,
    ) -> None:
        self._write = write
        self._max_size = max_size
        self._max_writers = writers
        self._lock = threading.Lock()
        self._queue: list[_Job[Item, Result]] = []
        self._writers = 0

    def submit(self, item: Item, size: int) -> Result:
        job: _Job[Item, Result] = _Job(item, size)
        with self._lock:
            self._queue.append(job)
            if self._writers < self._max_writers:
                self._writers += 1
                job.lead = True
        if not job.lead:
            job.woken.wait()
            if not job.lead:
                return self._outcome(job)
        # A writer writes its own batch and what waits behind it, but not a batch woken to
        # write (it takes its own group).
        with self._lock:
            self._queue.remove(job)
            group, rest, taken = [job], [], size
            for j in self._queue:
                if not j.lead and taken + j.size <= self._max_size:
                    group.append(j)
                    taken += j.size
                else:
                    rest.append(j)
            self._queue = rest
        try:
            outcomes = self._write([j.item for j in group])
            for j, outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    j.error = outcome
                else:
                    j.result = outcome
        except BaseException as exc:  # the group failed as a whole: each batch says so
            for j in group:
                j.error = exc
        finally:
            with self._lock:
                waiting = [j for j in self._queue if not j.lead]
                if waiting:
                    waiting[0].lead = True
                    waiting[0].woken.set()
                else:
                    self._writers -= 1
            for j in group:
                if j is not job:
                    j.woken.set()
        return self._outcome(job)

    @staticmethod
    def _outcome(job: _Job[Item, Result]) -> Result:
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result
