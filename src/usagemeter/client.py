"""The Python client: record usage from your own code.

    from usagemeter.client import UsageClient

    with UsageClient("http://127.0.0.1:8000", key="<operator or ingest key>") as usage:
        usage.record("lookups", account="acme", key="key_acme_prod", tags=["foo"])

Events are buffered and sent in batches, by a background thread, when ``batch_size`` are
waiting or ``flush_interval`` seconds have passed, and on ``flush()`` / ``close()``. Each
event gets its id when recorded, so a batch retried after a timeout is counted once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx

log = logging.getLogger("usagemeter.client")


class UsageError(RuntimeError):
    """The service refused a batch (a 4xx): retrying the same events will not help."""


class UsageClient:
    """Sends usage events to a usagemeter server."""

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
    ) -> None:
        self._http = http or httpx.Client(base_url=base_url, timeout=10.0)
        self._owns_http = http is None
        self._headers = {"Authorization": f"Bearer {key}"}
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retries = retries
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # one batch on the wire at a time, in order
        self._wake = threading.Event()
        self._closed = False
        self.accepted = 0
        self.duplicates = 0
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="usagemeter", daemon=True)
            self._thread.start()

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
            self._wake.set()
        return str(event["id"])

    def flush(self) -> None:
        """Send everything queued so far, and return when it is acknowledged."""
        with self._send_lock:
            while True:
                with self._lock:
                    batch = self._pending[: self._batch_size]
                    del self._pending[: self._batch_size]
                if not batch:
                    return
                self._send(batch)

    def _send(self, batch: list[dict[str, Any]]) -> None:
        delay = 0.2
        for attempt in range(self._retries + 1):
            try:
                response = self._http.post("/v1/events", json=batch, headers=self._headers)
            except httpx.TransportError as exc:
                problem = str(exc)
            else:
                if response.status_code == 200:
                    body = response.json()
                    self.accepted += body["accepted"]
                    self.duplicates += body["duplicates"]
                    return
                if response.status_code < 500 and response.status_code != 429:
                    # Refused as it stands: sending it again cannot help, so it is not kept.
                    raise UsageError(f"{response.status_code}: {response.text}")
                problem = f"{response.status_code}: {response.text}"
            if attempt == self._retries:
                break
            # The same ids go again: whatever part of the batch did land is not counted twice.
            log.warning("usage batch not acknowledged (%s); retrying in %.1fs", problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        with self._lock:  # keep the events for a later flush rather than drop them
            self._pending[:0] = batch
        raise UsageError(f"usage batch not acknowledged after {self._retries + 1} tries")

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
