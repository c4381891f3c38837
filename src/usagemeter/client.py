"""The Python client: record usage from your own code.

    from usagemeter.client import UsageClient

    with UsageClient("http://127.0.0.1:8000", key="<operator or ingest key>") as usage:
        usage.record("lookups", account="acme", key="key_acme_prod", tags=["foo"])

Events are buffered and sent in batches, by a background thread, when ``batch_size`` are
waiting or ``flush_interval`` seconds have passed, and on ``flush()`` / ``close()``. Each
event gets its id when recorded, so a batch retried after a timeout is counted once.
``AsyncUsageClient`` does the same on an asyncio event loop (``await usage.flush()``).

The server stores a batch whole or not at all. When it refuses one because some of its events
are bad (a 400 listing them by index), the client sets those aside in the dead-letter sink,
each with the server's reason, and sends the rest again with the same ids: one event for an
unknown account never costs the other events of its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

log = logging.getLogger("usagemeter.client")


class UsageError(RuntimeError):
    """The service refused a batch (a 4xx): retrying the same events will not help."""


DeadLetter = Callable[[dict[str, Any], str], None]
"""Called with each event the server refused and the server's reason for refusing it."""


class DeadLetterFile:
    """A dead-letter sink that appends one JSON line per refused event to ``path``:
    ``{"event": {...}, "reason": "..."}``. Fix the events and send the file's ``event``
    values again (``usagemeter ingest`` reads NDJSON)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any], reason: str) -> None:
        line = json.dumps({"event": event, "reason": reason}) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)


def _log_dead_letter(event: dict[str, Any], reason: str) -> None:
    log.error("usage event %s refused by the server: %s", event.get("id"), reason)


def _bad_indexes(response: httpx.Response, size: int) -> dict[int, str] | None:
    """The refused events of a 400 that names them (``error.details.errors[].index``), each
    with its message; None when the answer does not name events (the batch as a whole was
    refused: a bad key, a body that is not JSON)."""
    try:
        errors = response.json()["error"]["details"]["errors"]
        bad: dict[int, list[str]] = {}
        for e in errors:
            index = e["index"]
            if not isinstance(index, int) or not 0 <= index < size:
                return None
            bad.setdefault(index, []).append(str(e["message"]))
    except (ValueError, KeyError, TypeError):
        return None
    return {index: "; ".join(messages) for index, messages in bad.items()} or None


RETRY_DELAYS = (0.2, 0.4, 0.8, 1.6, 3.2, 5.0)  # then 5 s each: the cap


def _retry_delays(retries: int) -> Iterator[float]:
    for attempt in range(retries):
        yield RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]


def _retryable(response: httpx.Response) -> bool:
    return response.status_code >= 500 or response.status_code == 429


class _Batches:
    """What both clients share: the queue, the counts, the dead letters, and what to do with
    the server's answer to a batch. Sending is theirs (a thread, or the event loop)."""

    def __init__(
        self, key: str, batch_size: int, retries: int, dead_letter: DeadLetter | str | Path | None
    ) -> None:
        if dead_letter is None:
            self._dead_letter: DeadLetter = _log_dead_letter
        elif callable(dead_letter):
            self._dead_letter = dead_letter
        else:
            self._dead_letter = DeadLetterFile(dead_letter)
        self._headers = {"Authorization": f"Bearer {key}"}
        self._batch_size = batch_size
        self._retries = retries
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.accepted = 0
        self.duplicates = 0
        self.dead_letters = 0

    def record(
        self,
        metric: str,
        *,
        account: str | None = None,
        value: float = 1,
        key: str | None = None,
        ts: datetime | None = None,
        billable: bool = True,
        dimensions: Mapping[str, str] | None = None,
        tags: Iterable[str] = (),
        id: str | None = None,
    ) -> str:
        """Queue one event; returns its id. ``ts`` defaults to now."""
        if self._closed:
            raise RuntimeError("the client is closed")
        event: dict[str, Any] = {
            "id": id or uuid.uuid4().hex,
            "metric": metric,
            "ts": (ts or datetime.now(UTC)).isoformat(),
            "value": value,
            "billable": billable,
        }
        if account is not None:
            event["account"] = account
        if key is not None:
            event["key"] = key
        if dimensions:
            event["dimensions"] = dict(dimensions)
        tag_list = sorted(set(tags))
        if tag_list:
            event["tags"] = tag_list
        with self._lock:
            self._pending.append(event)
            full = len(self._pending) >= self._batch_size
        if full:
            self._batch_full()
        return str(event["id"])

    def _batch_full(self) -> None:
        """A batch is waiting: wake the sender."""

    def _next_batch(self) -> list[dict[str, Any]]:
        with self._lock:
            batch = self._pending[: self._batch_size]
            del self._pending[: self._batch_size]
        return batch

    def _keep(self, batch: list[dict[str, Any]]) -> UsageError:
        """Put an unacknowledged batch back for a later flush rather than drop it."""
        with self._lock:
            self._pending[:0] = batch
        return UsageError(f"usage batch not acknowledged after {self._retries + 1} tries")

    def _answered(
        self, batch: list[dict[str, Any]], response: httpx.Response
    ) -> list[dict[str, Any]]:
        """Count an acknowledged batch; else set its refused events aside and return the rest,
        to be sent again with the same ids (nothing of a refused batch was stored)."""
        if response.status_code == 200:
            body = response.json()
            self.accepted += body["accepted"]
            self.duplicates += body["duplicates"]
            return []
        bad = _bad_indexes(response, len(batch)) if response.status_code == 400 else None
        if bad is None:
            # Refused as a whole (a bad key, say): sending it again cannot help, and keeping
            # it would block every later batch, so it goes to the dead letters, loudly.
            reason = f"{response.status_code}: {response.text}"
            self._set_aside(batch, dict.fromkeys(range(len(batch)), reason))
            raise UsageError(reason)
        self._set_aside(batch, bad)
        return [e for i, e in enumerate(batch) if i not in bad]

    def _set_aside(self, batch: list[dict[str, Any]], reasons: Mapping[int, str]) -> None:
        for index, reason in sorted(reasons.items()):
            self.dead_letters += 1
            try:
                self._dead_letter(batch[index], reason)
            except Exception:  # a broken sink must not stop the good events
                log.exception("dead-letter sink failed for event %s", batch[index].get("id"))


def _retrying(problem: str, delay: float) -> None:
    # The same ids go again: whatever part of the batch did land is not counted twice.
    log.warning("usage batch not acknowledged (%s); retrying in %.1fs", problem, delay)


class UsageClient(_Batches):
    """Sends usage events to a usagemeter server, from a background thread."""

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        retries: int = 5,
        http: httpx.Client | None = None,
        background: bool = True,
        dead_letter: DeadLetter | str | Path | None = None,
    ) -> None:
        """``dead_letter`` receives every event the server refuses, with its reason: a
        callable ``(event, reason)``, or a file path for NDJSON lines (``DeadLetterFile``).
        Default: each one is logged as an error. ``self.dead_letters`` counts them."""
        super().__init__(key, batch_size, retries, dead_letter)
        self._http = http or httpx.Client(base_url=base_url, timeout=10.0)
        self._owns_http = http is None
        self._flush_interval = flush_interval
        self._send_lock = threading.Lock()  # one batch on the wire at a time, in order
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="usagemeter", daemon=True)
            self._thread.start()

    def _batch_full(self) -> None:
        self._wake.set()

    def flush(self) -> None:
        """Send everything queued so far, and return when it is acknowledged."""
        with self._send_lock:
            while batch := self._next_batch():
                while batch:
                    batch = self._answered(batch, self._post(batch))

    def _post(self, batch: list[dict[str, Any]]) -> httpx.Response:
        """The server's answer to a batch, retrying transport errors, 429 and 5xx."""
        delays = _retry_delays(self._retries)
        while True:
            try:
                response = self._http.post("/v1/events", json=batch, headers=self._headers)
                if not _retryable(response):
                    return response
                problem = f"{response.status_code}: {response.text}"
            except httpx.TransportError as exc:
                problem = str(exc)
            delay = next(delays, None)
            if delay is None:
                raise self._keep(batch)
            _retrying(problem, delay)
            time.sleep(delay)

    def check(self, metric: str, account: str) -> dict[str, Any]:
        """The account's limit on ``metric`` this period: ``used``, ``amount``,
        ``remaining``, ``exceeded`` and ``action`` ("block" asks you to refuse). It counts
        what the server has acknowledged: events still queued here are not in it (call
        ``flush()`` first when they must be). UsageError when the account has no such limit
        or the key may not read it."""
        path = f"/v1/accounts/{quote(account, safe='')}/limits/{quote(metric, safe='')}"
        response = self._http.get(path, headers=self._headers)
        if response.status_code != 200:
            raise UsageError(f"check of {metric!r} for {account!r}: {response.text}")
        answer: dict[str, Any] = response.json()
        return answer

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            try:
                self.flush()
            except UsageError as exc:
                log.error("%s", exc)

    def close(self) -> None:
        """Flush what is queued and stop the background thread."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.flush()
        finally:
            if self._owns_http:
                self._http.close()

    def __enter__(self) -> UsageClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncUsageClient(_Batches):
    """The same client for asyncio code: ``record()`` queues (it never waits), a task on the
    running loop sends a batch when ``batch_size`` are waiting or every ``flush_interval``
    seconds, and ``await flush()`` / ``await aclose()`` send the rest.

        async with AsyncUsageClient("http://127.0.0.1:8000", key="...") as usage:
            usage.record("lookups", account="acme")
    """

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        retries: int = 5,
        http: httpx.AsyncClient | None = None,
        dead_letter: DeadLetter | str | Path | None = None,
    ) -> None:
        super().__init__(key, batch_size, retries, dead_letter)
        self._http = http or httpx.AsyncClient(base_url=base_url, timeout=10.0)
        self._owns_http = http is None
        self._flush_interval = flush_interval
        self._send_lock: asyncio.Lock | None = None  # made on the loop that uses it
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def _batch_full(self) -> None:
        self._start()
        if self._wake is not None:
            self._wake.set()

    def _start(self) -> None:
        """The sending task, on the running loop (none yet when recording from a thread)."""
        if self._task is not None or self._closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._send_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="usagemeter")

    async def flush(self) -> None:
        """Send everything queued so far, and return when it is acknowledged."""
        if self._send_lock is None:
            self._send_lock = asyncio.Lock()
        async with self._send_lock:
            while batch := self._next_batch():
                while batch:
                    batch = self._answered(batch, await self._post(batch))

    async def _post(self, batch: list[dict[str, Any]]) -> httpx.Response:
        delays = _retry_delays(self._retries)
        while True:
            try:
                response = await self._http.post("/v1/events", json=batch, headers=self._headers)
                if not _retryable(response):
                    return response
                problem = f"{response.status_code}: {response.text}"
            except httpx.TransportError as exc:
                problem = str(exc)
            delay = next(delays, None)
            if delay is None:
                raise self._keep(batch)
            _retrying(problem, delay)
            await asyncio.sleep(delay)

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            try:
                await self.flush()
            except UsageError as exc:
                log.error("%s", exc)

    async def aclose(self) -> None:
        """Flush what is queued and stop the sending task."""
        self._closed = True
        if self._task is not None:
            # Not cancelled: a batch on the wire would be lost with it. Woken, the task ends
            # after the flush under way.
            assert self._wake is not None
            self._wake.set()
            await self._task
        try:
            await self.flush()
        finally:
            if self._owns_http:
                await self._http.aclose()

    async def __aenter__(self) -> AsyncUsageClient:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
