"""The hand-rolled PostgreSQL peer: a raw events table, B-tree indexes, GROUP BY date_trunc.

The bench runs its own throwaway cluster (initdb in a temp dir, loopback port, socket in the
temp dir) and removes it after. PostgreSQL refuses to run as root, so as root the server runs
as the `postgres` user that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.questions import Answer, Question, group_of

SCHEMA = """
CREATE TABLE events (
    account text NOT NULL,
    key text,
    metric text NOT NULL,
    ts timestamptz NOT NULL,
    value double precision NOT NULL,
    billable boolean NOT NULL,
    dims jsonb NOT NULL,
    tags text[] NOT NULL
)
"""
# The issue asks for (key, ts); account-wide questions would scan the table without the second,
# which no one would ship: the peer gets both.
INDEXES = (
    "CREATE INDEX events_key_ts ON events (key, ts)",
    "CREATE INDEX events_account_metric_ts ON events (account, metric, ts)",
)
# A throwaway cluster: durability off for the load (its ingest is not what is compared), memory
# sized for this machine, JIT off (it costs more than it saves on queries of this size).
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "1GB",
    "work_mem": "64MB",
    "maintenance_work_mem": "512MB",
    "max_wal_size": "8GB",
    "jit": "off",
    "timezone": "UTC",
}
AGGREGATES = {
    "count": "count(*)",
    "sum": "sum(value)",
    "unique_count": "count(DISTINCT dims->>{unique})",
    "latest": "(array_agg(value ORDER BY ts DESC))[1]",
}


def _bindir() -> Path:
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / "initdb").exists():
            return base
    raise FileNotFoundError("PostgreSQL server binaries")


def find_or_install() -> Path:
    """The newest installed server's bin dir, installing Debian's package if there is none."""
    try:
        return _bindir()
    except FileNotFoundError:
        if os.geteuid() != 0:
            raise
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env)
    return _bindir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sql(q: Question) -> tuple[str, dict[str, Any]]:
    """The peer's query: one pass, buckets and totals together through GROUPING SETS."""
    unit = {"day": "day", "hour": "hour"}[q.granularity]
    tz = _literal(q.tz)
    where = ["account = %(account)s", "metric = %(metric)s", "ts >= %(start)s", "ts < %(end)s"]
    params: dict[str, Any] = {
        "account": q.account,
        "metric": q.metric,
        "start": q.start,
        "end": q.end,
    }
    if q.key is not None:
        where.append("key = %(key)s")
        params["key"] = q.key
    if q.billable:
        where.append("billable")
    if q.tags:
        where.append("tags @> %(tags)s::text[]")
        params["tags"] = list(q.tags)
    group = f", dims->>{_literal(q.group_by)} AS g" if q.group_by else ""
    agg = AGGREGATES[q.aggregation].format(unique=_literal(q.unique_dimension or ""))
    sets = "(b, g), (g), ()" if q.group_by else "(b), ()"
    text = (
        f"SELECT b, {'g' if q.group_by else 'NULL'}, {agg} FROM ("
        f"SELECT date_trunc('{unit}', ts AT TIME ZONE {tz}) AT TIME ZONE {tz} AS b{group},"
        f" ts, value, dims FROM events WHERE {' AND '.join(where)}"
        f") AS e GROUP BY GROUPING SETS ({sets})"
    )
    return text, params


class PostgresPeer:
    name = "PostgreSQL"
    settings = SETTINGS

    def __init__(self) -> None:
        self.bindir = find_or_install()
        self.root = Path(tempfile.mkdtemp(prefix="usagemeter-bench-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user = self._os_user()
        self.conn: psycopg.Connection[Any] | None = None
        self.indexed = False
        os.chmod(self.root, 0o755)
        if self.user:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "bench", "--auth=trust", "-E", "UTF8")
        with (self.data / "postgresql.conf").open("a") as f:
            f.writelines(f"{k} = '{v}'\n" for k, v in self.settings.items())
        self.start()
        self.execute(SCHEMA)

    @staticmethod
    def _os_user() -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
        return "postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def version(self) -> str:
        row = self.execute("SHOW server_version")
        return str(row[0][0]).split()[0]

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root}"
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", log, "-w", "start")
        self.conn = psycopg.connect(
            host=str(self.root), port=self.port, user="bench", dbname="postgres", autocommit=True
        )

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """A fresh server process: the cold run then meets no cached plan or backend state."""
        self.stop()
        self.start()

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def execute(self, text: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        assert self.conn is not None
        cur = self.conn.execute(text, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []

    def load(self, tsv: bytes) -> float:
        """COPY rows in (see render.tsv), index and analyse; returns seconds taken."""
        assert self.conn is not None
        t0 = time.perf_counter()
        cols = "account, key, metric, ts, value, billable, dims, tags"
        with self.conn.cursor() as cur, cur.copy(f"COPY events ({cols}) FROM STDIN") as copy:
            step = 1 << 22
            for i in range(0, len(tsv), step):
                copy.write(tsv[i : i + step])
        if not self.indexed:
            for index in INDEXES:
                self.execute(index)
            self.indexed = True
        self.execute("VACUUM ANALYZE events")
        return time.perf_counter() - t0

    def count(self) -> int:
        return int(self.execute("SELECT count(*) FROM events")[0][0])

    def run(self, q: Question) -> list[tuple[Any, ...]]:
        text, params = sql(q)
        return self.execute(text, params)

    def answer(self, q: Question, rows: list[tuple[Any, ...]]) -> Answer:
        out = Answer()
        for b, g, v in rows:
            if b is not None:
                start = max(int(b.timestamp() * 1000), q.start_ms)
                out.add_bucket(start, group_of(q, g), v)
            elif g is not None or not q.group_by:
                out.add_total(group_of(q, g), v)
            if b is None and g is None:
                out.total = float(v or 0)
        return out
