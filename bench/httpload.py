"""A small HTTP/1.1 load client: keep-alive connections on blocking sockets, one thread each.

The ingest figures must measure the server, not the client. On two cores the client shares
the machine with the server: httpx, or even a bare asyncio client, spends 0.2-0.3 ms of CPU
per request, which would cap single-event requests below the target. A blocking socket with
prepared bytes costs ~30 us, and the threads wait in the kernel with the GIL released.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from bench.timing import in_threads


@dataclass
class Response:
    status: int
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


class Connection:
    """One keep-alive connection; requests on it run one after another."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.base = f"Host: {host}:{port}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        self.sock: socket.socket | None = None
        self.file: BinaryIO | None = None

    def _open(self) -> None:
        self.sock = socket.create_connection((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> Response:
        if self.sock is None:
            self._open()
        assert self.sock is not None and self.file is not None
        head = (
            f"{method} {path} HTTP/1.1\r\n{self.base}"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        status = int(self.file.readline().split(b" ", 2)[1])
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = self._read_chunked()
        else:
            data = self.file.read(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Response(status, data)

    def _read_chunked(self) -> bytes:
        assert self.file is not None
        parts = []
        while size := int(self.file.readline().split(b";")[0], 16):
            parts.append(self.file.read(size))
            self.file.readline()
        self.file.readline()
        return b"".join(parts)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self.file = None


def _in_threads(
    target: tuple[str, int, dict[str, str]],
    clients: int,
    count: int,
    step: Callable[[Connection, int], bool],
) -> float:
    """Run `step(conn, i)` for i in range(count) on `clients` threads, each with its own
    connection, until done or a step returns False; the seconds taken."""
    items = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        conn = Connection(*target)
        try:
            while True:
                with lock:
                    i = next(items, None)
                if i is None or not step(conn, i):
                    return
        finally:
            conn.close()

    return in_threads(worker, clients)


@dataclass
class LoadResult:
    requests: int = 0
    seconds: float = 0.0
    accepted: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)


def post_all(
    host: str,
    port: int,
    headers: dict[str, str],
    path: str,
    bodies: Sequence[bytes],
    clients: int,
    max_seconds: float | None = None,
) -> LoadResult:
    """POST every body (in order, `clients` at a time), stopping early after `max_seconds`.

    Each reply must be 200 with {"accepted": n, "duplicates": m}; the first other one stops
    that client and is kept in `errors`.
    """
    result = LoadResult()
    lock = threading.Lock()
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds

    def step(conn: Connection, i: int) -> bool:
        if deadline is not None and time.perf_counter() > deadline:
            return False
        resp = conn.request("POST", path, bodies[i])
        with lock:
            result.requests += 1
            if resp.status != 200:
                result.errors.append(f"{resp.status} {resp.body[:300]!r}")
                return False
            reply = resp.json()
            assert isinstance(reply, dict)
            result.accepted += int(reply.get("accepted", 0))
            result.duplicates += int(reply.get("duplicates", 0))
        return True

    result.seconds = _in_threads((host, port, headers), clients, len(bodies), step)
    return result


def send_each(
    host: str,
    port: int,
    headers: dict[str, str],
    requests: Sequence[tuple[str, str, bytes]],
    clients: int = 8,
) -> list[Response]:
    """Send (method, path, body) requests, `clients` at a time; responses in request order."""
    out: list[Response | None] = [None] * len(requests)

    def step(conn: Connection, i: int) -> bool:
        method, path, body = requests[i]
        out[i] = conn.request(method, path, body)
        return True

    _in_threads((host, port, headers), clients, len(requests), step)
    return [r for r in out if r is not None]
