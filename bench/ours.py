"""Our service, driven as a user would: a real `usagemeter serve` process over HTTP."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import httpx

from bench import httpload
from bench.questions import Answer, Question

HOST = "127.0.0.1"


def _executable() -> list[str]:
    script = Path(sys.executable).parent / "usagemeter"
    return [str(script)] if script.exists() else [sys.executable, "-m", "usagemeter.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants (uvicorn may fork workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return out


def _status_kb(pid: int, field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class MemoryWatch:
    """Peak RSS of a process tree: VmHWM of each process, and sampled VmRSS of the sum."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.every = pid, every
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        pids = process_tree(self.pid)
        rss = sum(_status_kb(p, "VmRSS") for p in pids)
        hwm = max((_status_kb(p, "VmHWM") for p in pids), default=0)
        self.peak_kb = max(self.peak_kb, rss, hwm)

    def stop(self) -> int:
        """Stop polling; the peak in bytes."""
        self.sample()
        self._stop.set()
        self._thread.join()
        return self.peak_kb * 1024


class Service:
    """One database, served by successive server processes (restarted for cold runs)."""

    name = "usagemeter"

    def __init__(self, workdir: Path | None = None, store: str | None = None) -> None:
        self.root = Path(workdir or tempfile.mkdtemp(prefix="usagemeter-bench-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "usagemeter.db"
        self.store = store or str(self.db)  # --store: the SQLite file, or a PostgreSQL URL
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.memory: MemoryWatch | None = None
        self.client: httpx.Client | None = None
        self.env = self._snapshot()
        self.secret = self._operator_key()

    def _snapshot(self) -> dict[str, str]:
        """Run the server from a copy of the package taken now: a run lasts minutes, and code
        edited meanwhile (a new rollup table, say) must not meet a database the old code
        filled. The copy is what is installed, so a normal run is unchanged."""
        spec = importlib.util.find_spec("usagemeter")
        if spec is None or not spec.submodule_search_locations:
            return dict(os.environ)
        source = Path(next(iter(spec.submodule_search_locations)))
        target = self.root / "code"
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(source, target / "usagemeter", ignore=ignore, dirs_exist_ok=True)
        path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": path}

    def _operator_key(self) -> str:
        out = subprocess.run(
            [*_executable(), "keys", "create", "--operator", "--store", self.store],
            check=True,
            capture_output=True,
            text=True,
            env=self.env,
        ).stdout
        return str(json.loads(out[out.index("{") :])["key"])

    @property
    def version(self) -> str:
        return importlib.metadata.version("usagemeter")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def start(self) -> None:
        log = (self.root / "server.log").open("ab")
        cmd = [*_executable(), "serve", "--store", self.store, "--host", HOST]
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        self.memory = MemoryWatch(self.proc.pid)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{HOST}:{self.port}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /healthz in 300 s: see {log.name}")
            time.sleep(0.05)
        self.client = httpx.Client(
            base_url=f"http://{HOST}:{self.port}", headers=self.headers, timeout=120
        )

    def stop(self) -> int:
        """Stop the server; its peak RSS in bytes."""
        peak = self.memory.stop() if self.memory else 0
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        return peak

    def restart(self) -> int:
        peak = self.stop()
        self.start()
        return peak

    def close(self, keep: bool = False) -> None:
        self.stop()
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def db_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("usagemeter.db*"))

    # ------------------------------------------------------------------ setup and ingest

    def send(self, requests: Sequence[tuple[str, str, bytes]]) -> list[httpload.Response]:
        return httpload.send_each(HOST, self.port, self.headers, requests)

    def create(self, accounts: Iterable[str], keys: Iterable[tuple[str, str]]) -> None:
        """Accounts, then keys as (account, key id); an existing one is fine (409)."""
        reqs = [
            ("POST", "/v1/accounts", json.dumps({"id": a, "name": a}).encode()) for a in accounts
        ]
        for resp in self.send(reqs):
            if resp.status not in (201, 409):
                raise RuntimeError(f"POST /v1/accounts: {resp.status} {resp.body[:300]!r}")
        reqs = [
            (
                "POST",
                f"/v1/accounts/{a}/keys",
                json.dumps({"id": k, "name": k, "prefix": "ak_"}).encode(),
            )
            for a, k in keys
        ]
        for resp in self.send(reqs):
            if resp.status not in (201, 409):
                raise RuntimeError(f"POST keys: {resp.status} {resp.body[:300]!r}")

    def post_events(
        self, bodies: list[bytes], clients: int, max_seconds: float | None = None
    ) -> httpload.LoadResult:
        return httpload.post_all(
            HOST, self.port, self.headers, "/v1/events", bodies, clients, max_seconds
        )

    def counts(self, queries: list[dict[str, str]]) -> list[float]:
        """The `total` of each query (params), many at once."""
        reqs = [("GET", "/v1/query?" + str(httpx.QueryParams(q)), b"") for q in queries]
        out = []
        for q, resp in zip(queries, self.send(reqs), strict=True):
            if resp.status != 200:
                raise RuntimeError(f"GET /v1/query {q}: {resp.status} {resp.body[:300]!r}")
            body = resp.json()
            assert isinstance(body, dict)
            out.append(float(body.get("total") or 0))
        return out

    # ------------------------------------------------------------------ questions

    @staticmethod
    def params(q: Question) -> dict[str, str]:
        params = {
            "metric": q.metric,
            "account": q.account,
            "start": _iso(q.start),
            "end": _iso(q.end),
            "granularity": q.granularity,
            "tz": q.tz,
        }
        if q.key is not None:
            params["key"] = q.key
        if q.tags:
            params["tags"] = ",".join(q.tags)
        if q.billable is not None:
            params["billable"] = "true" if q.billable else "false"
        if q.group_by:
            params["group_by"] = q.group_by
        if q.explicit_aggregation:
            params["aggregation"] = q.aggregation
        return params

    def run(self, q: Question) -> bytes:
        assert self.client is not None
        resp = self.client.get("/v1/query", params=self.params(q))
        if resp.status_code != 200:
            raise RuntimeError(f"GET {resp.url}: {resp.status_code} {resp.text[:500]}")
        return resp.content

    def answer(self, q: Question, body: bytes) -> Answer:
        data = json.loads(body)
        out = Answer()
        for bucket in data["buckets"]:
            start = int(datetime.fromisoformat(bucket["start"]).timestamp() * 1000)
            for group in bucket["groups"]:
                out.add_bucket(start, tuple(sorted(group["group"].items())), group["value"])
        for group in data.get("totals") or []:
            out.add_total(tuple(sorted(group["group"].items())), group["value"])
        out.total = float(data.get("total") or 0)
        return out

    def get(self, path: str, headers: dict[str, str]) -> httpx.Response:
        """A request with its own auth headers (the seed endpoints each have their own)."""
        assert self.client is not None
        req = self.client.build_request("GET", path)
        for name in ("Authorization", *headers):
            req.headers.pop(name, None)
        req.headers.update(headers)
        return self.client.send(req)
