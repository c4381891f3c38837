"""Two real `usagemeter serve` processes on one PostgreSQL database: batches sent to both at
once and retried against the other when one is killed (SIGKILL) mid-stream; afterwards every
process answers the exact totals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_database
from usagemeter.auth import issue_key
from usagemeter.model import Account, Scope
from usagemeter.store.postgres import PostgresStore

BATCHES = 24
PER_BATCH = 250
KILL_AFTER = 8  # batches acknowledged before the second process is killed
START = "2025-01-01"
BASE_MS = 1_735_689_600_000


class Server:
    """One `usagemeter serve` process on a free loopback port."""

    def __init__(self, url: str, log: Path, *options: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "USAGEMETER_STORE": url}
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "usagemeter", "serve", "--port", str(self.port), *options],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        for _ in range(300):  # bounded: at most about 30 s
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"serve did not answer: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def shared_database(postgres_server: str) -> Iterator[tuple[str, str]]:
    """A new database with one account and an operator key; its URL and the key's secret."""
    url = make_database(postgres_server, "usagemeter_two_processes")
    store = PostgresStore(url)
    store.create_account(Account("acme", "Acme"))
    _, secret = issue_key(store, None, name="ops", scopes=[Scope.OPERATOR])
    store.close()
    yield url, secret


def _batch(n: int) -> list[dict[str, object]]:
    return [
        {
            "id": f"b{n}-{i}",
            "account": "acme",
            "metric": "lookups",
            "ts": BASE_MS + (n * PER_BATCH + i) * 7_000,  # spread over about 50 days
            "value": i % 7,
            "dimensions": {"agent": f"agent{i % 3}"},
        }
        for i in range(PER_BATCH)
    ]


def test_two_processes_one_killed_mid_stream_agree_on_exact_totals(
    shared_database: tuple[str, str], tmp_path: Path
) -> None:
    url, secret = shared_database
    headers = {"Authorization": f"Bearer {secret}"}
    servers = [Server(url, tmp_path / "a.log"), Server(url, tmp_path / "b.log")]
    acknowledged = threading.Semaphore(0)
    accepted: list[int] = []
    lock = threading.Lock()

    def deliver(n: int, first: int) -> None:
        """Send batch n to one server and, at the same moment, to the other (a client
        retrying elsewhere); on any failure retry against the other, until acknowledged."""
        body = _batch(n)
        target = first
        for _ in range(200):  # bounded retries
            server = servers[target]
            try:
                response = httpx.post(
                    f"{server.base}/v1/events", json=body, headers=headers, timeout=30
                )
                if response.status_code == 200:
                    with lock:
                        accepted.append(response.json()["accepted"])
                    acknowledged.release()
                    return
            except httpx.TransportError:
                pass
            target = 1 - target
            time.sleep(0.02)
        raise AssertionError(f"batch {n} was never acknowledged")

    def killer() -> None:
        for _ in range(KILL_AFTER):
            acknowledged.acquire()
        os.kill(servers[1].process.pid, signal.SIGKILL)

    try:
        threads = [threading.Thread(target=killer)]
        for n in range(BATCHES):
            # Each batch twice: to both servers at once, in both orders.
            threads.append(threading.Thread(target=deliver, args=(n, n % 2)))
            threads.append(threading.Thread(target=deliver, args=(n, 1 - n % 2)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert servers[1].process.wait(10) == -signal.SIGKILL
        # No acknowledgement counts an event twice. (Fewer is possible: a batch the killed
        # process committed but never answered comes back as duplicates on retry.)
        assert sum(accepted) <= BATCHES * PER_BATCH

        servers[1] = Server(url, tmp_path / "b.log")  # the killed process, back
        expected_sum = sum(float(e["value"]) for n in range(BATCHES) for e in _batch(n))  # type: ignore[arg-type]
        for server in servers:
            response = httpx.get(
                f"{server.base}/v1/query",
                params={
                    "metric": "lookups",
                    "account": "acme",
                    "start": START,
                    "end": "2025-04-01",
                    "granularity": "month",
                },
                headers=headers,
            )
            assert response.status_code == 200, response.text
            assert response.json()["total"] == BATCHES * PER_BATCH
            summed = httpx.get(
                f"{server.base}/v1/query",
                params={
                    "metric": "lookups",
                    "account": "acme",
                    "end": "2025-04-01",
                    "start": "2024-12-31",  # a New York day starts at 05:00 UTC
                    "granularity": "day",
                    "tz": "America/New_York",
                    "group_by": "agent",
                    "aggregation": "sum",
                },
                headers=headers,
            ).json()
            assert summed["total"] == expected_sum
        store = PostgresStore(url)
        assert store.count_events() == BATCHES * PER_BATCH
        store.close()
    finally:
        for server in servers:
            server.stop()
