"""How ``usagemeter serve`` runs uvicorn: timeouts and limits against slow or idle clients.

uvicorn times out an idle keep-alive connection, but not a request head that arrives slowly
(or never): a client that opens a connection and sends "GET / HTTP/1.1\\r\\nHost:" holds a
file descriptor for ever, and about a thousand of them used up a 1,024-descriptor limit so
that new requests failed. Here the whole request head must arrive within ``header_timeout``
seconds; connections are capped below the descriptor limit, and at the cap the connection
that has waited longest for a request head is closed to make room (uvicorn answers 503 only
while every connection is busy); and the soft descriptor limit is raised to the hard one
where the system allows.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

DESCRIPTORS_SPARE = 64  # kept free for the database files, logs and the listening socket
# Allocations between two passes of the cycle collector over the young objects (Python's
# default: 700). A batch of 1,000 events allocates several thousand tracked objects (events,
# their dimension dicts, rows), none of them in a cycle, so the default ran a pass every
# fifth of a batch and a full one every few batches.
YOUNG_PASS_EVERY = 50_000


def freeze_long_lived() -> None:
    """Move every object made so far (modules, the app, what startup built) out of the cycle
    collector's sight: they live as long as the process, and a full pass would walk them all
    inside some request or batch."""
    gc.collect()
    gc.freeze()


@contextmanager
def collector_tuned() -> Iterator[None]:
    """For a stretch of ingest: move the objects made so far (modules, the app) out of the
    cycle collector's sight, as they live on, and let the young generation grow before a
    pass. Cycles are still collected, less often. Undone on leaving."""
    freeze_long_lived()
    before = gc.get_threshold()
    gc.set_threshold(YOUNG_PASS_EVERY, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


@dataclass(frozen=True)
class ServeLimits:
    header_timeout: float = 10.0  # seconds for a whole request head, from the first wait
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection is kept
    limit_concurrency: int | None = None  # None: the descriptor limit less a margin
    backlog: int = 2048  # connections the kernel queues before uvicorn accepts them


def protocol_with(header_timeout: float, limit: int) -> type[Any]:
    """uvicorn's httptools protocol, closing connections whose request head is late and,
    when ``limit`` connections are open, the one that has waited longest for a head.
    (Built on demand: importing uvicorn costs every other CLI command a quarter second.)"""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._waiting_since = 0.0

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._waiting_since = self.loop.time()
            self._head_timer = self.loop.call_later(header_timeout, self._close)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _close(self) -> None:
            self._cancel_head_timer()
            if not self.transport.is_closing():
                self.transport.close()
            # Counted out now: uvicorn drops it from its set only in connection_lost, which
            # may come after the next request's headers, still counting it against the cap.
            self.connections.discard(self)

        def _make_room(self) -> None:
            # uvicorn answers 503 to every request while `limit` connections are open, and
            # idle ones (slow heads, parked keep-alives) would hold that state, and the
            # descriptors, until they time out. Closing the longest-waiting idle ones keeps a
            # place for a client that sends a request now.
            excess = len(self.connections) - (limit - 1)
            if excess <= 0:
                return
            idle = [
                c
                for c in self.connections
                if isinstance(c, HeaderTimeoutProtocol) and c is not self and c._head_timer
            ]
            for connection in sorted(idle, key=lambda c: c._waiting_since)[:excess]:
                connection._close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()  # the first request's head is due
            self._make_room()

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self.pipeline:
                self._arm_head_timer()  # the next request's head is due

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def raise_descriptor_limit() -> int:
    """Raise the soft open-files limit to the hard one; the limit now in force."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 65536


def uvicorn_config(app: Any, host: str, port: int, access_log: bool, limits: ServeLimits) -> Any:
    """The uvicorn Config for ``app`` under ``limits``."""
    import uvicorn

    concurrency = limits.limit_concurrency
    if concurrency is None:
        concurrency = max(16, raise_descriptor_limit() - DESCRIPTORS_SPARE)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=access_log,
        http=protocol_with(limits.header_timeout, concurrency),
        timeout_keep_alive=limits.keep_alive_timeout,
        limit_concurrency=concurrency,
        backlog=limits.backlog,
    )
