"""The served process: slow clients (issue 12, item 13) and SIGKILL during ingest."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.live import serve_in_thread
from usagemeter.api.app import create_app
from usagemeter.auth import issue_key
from usagemeter.engine import Engine
from usagemeter.meters import MeterRegistry
from usagemeter.model import Account, Query, Scope
from usagemeter.serving import ServeLimits
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import Granularity


@pytest.fixture
def slow_guarded(store: SQLiteStore) -> Iterator[tuple[str, int]]:
    limits = ServeLimits(header_timeout=0.3)
    yield from serve_in_thread(create_app(store), limits)


def closed_by_server(conn: socket.socket) -> bool:
    """True once the server closes ``conn``; False if it stays open for 10 s."""
    conn.settimeout(10)
    try:
        while conn.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_a_request_head_that_never_completes_is_closed(
    slow_guarded: tuple[str, int],
) -> None:
    """Partial headers were never timed out: each such client held a descriptor for ever."""
    with socket.create_connection(slow_guarded) as partial:
        partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow:")
        assert closed_by_server(partial)
    with socket.create_connection(slow_guarded) as silent:
        assert closed_by_server(silent)
    # After a complete request on a keep-alive connection, the next head is due as well.
    with socket.create_connection(slow_guarded) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert closed_by_server(conn)


@pytest.fixture
def capped(store: SQLiteStore) -> Iterator[tuple[str, int]]:
    yield from serve_in_thread(create_app(store), ServeLimits(limit_concurrency=4))


def test_at_the_connection_cap_the_longest_idle_connection_makes_room(
    capped: tuple[str, int],
) -> None:
    """1,100 idle connections under a 1,024-descriptor limit made new requests fail."""
    idle = [socket.create_connection(capped) for _ in range(4)]
    for s in idle:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost:")  # a head that never completes
    try:
        with socket.create_connection(capped) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_by_server(idle[0])  # long before its 10 s header timeout
    finally:
        for s in idle:
            s.close()


# ------------------------------------------------------------- SIGKILL under load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(db: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "usagemeter", "serve", "--db", str(db), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("the server did not start")


def test_sigkill_during_concurrent_ingest_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """Clients retry every batch until it is acknowledged; the server is killed with SIGKILL
    mid-load and started again on the same file. Every event counts exactly once."""
    db = tmp_path / "kill.db"
    setup = SQLiteStore(db)
    setup.create_account(Account("acme", "Acme"))
    secret = issue_key(setup, None, scopes=[Scope.OPERATOR])[1]
    setup.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/events"
    headers = {"Authorization": f"Bearer {secret}"}
    workers, batches, size = 4, 12, 25
    acknowledged: list[int] = []
    lock = threading.Lock()

    def send_all(worker: int) -> None:
        with httpx.Client(timeout=5) as client:
            for b in range(batches):
                batch = [
                    {
                        "id": f"w{worker}-b{b}-e{i}",
                        "account": "acme",
                        "metric": "calls",
                        "ts": 1735776000000 + (worker * 1000 + b * size + i) * 1000,
                        "value": 1,
                    }
                    for i in range(size)
                ]
                for _ in range(600):  # retried as a client would: the same batch, same ids
                    try:
                        response = client.post(url, json=batch, headers=headers)
                    except httpx.TransportError:
                        time.sleep(0.02)
                        continue
                    if response.status_code == 200:
                        body = response.json()
                        with lock:
                            acknowledged.append(body["accepted"])
                        break
                    time.sleep(0.02)
                else:
                    raise AssertionError(f"batch {b} of worker {worker} never acknowledged")

    proc = start_server(db, port)
    threads = [threading.Thread(target=send_all, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    while True:  # kill once some, not all, batches are in
        with lock:
            if len(acknowledged) >= workers * batches // 4:
                break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(acknowledged)
    proc = start_server(db, port)
    try:
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
    finally:
        proc.terminate()
        proc.wait(30)
    assert killed_at < workers * batches
    wal = Path(f"{db}-wal")  # a clean shutdown (SIGTERM) checkpoints the WAL away
    assert not wal.exists() or wal.stat().st_size == 0
    total = workers * batches * size
    store = SQLiteStore(db)
    try:
        assert store.count_events() == total  # none lost, none doubled
        query = Query(
            accounts=("acme",),
            metric="calls",
            start=datetime(2025, 1, 1, tzinfo=UTC),
            end=datetime(2025, 2, 1, tzinfo=UTC),
            granularity=Granularity.TOTAL,
        )
        assert Engine(store, MeterRegistry()).run(query).total == (total,)  # rollups too
    finally:
        store.close()
    # A batch cut off by the kill may have committed before its answer was lost: its retry
    # is then answered as duplicates. So acknowledged "accepted" counts never exceed it.
    assert len(acknowledged) == workers * batches
    assert sum(acknowledged) <= total


def test_the_collector_is_tuned_for_ingest_and_restored_after() -> None:
    import gc

    from usagemeter.serving import YOUNG_PASS_EVERY, collector_tuned

    before = gc.get_threshold()
    with collector_tuned():
        assert gc.get_threshold() == (YOUNG_PASS_EVERY, *before[1:])
        assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's sight
        # A cycle made now is still collected.
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
