"""The ClickHouse peer: raw events in a MergeTree table, in-process through chDB.

What a team would build on ClickHouse without rollups: one wide table sorted by
(account, metric, ts), GROUP BY toStartOfDay(ts, tz), a scan of the account's range per query.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import chdb
from chdb import session

from bench.questions import Answer, Question, group_of

SCHEMA = """
CREATE TABLE bench.events (
    account LowCardinality(String),
    key LowCardinality(String),
    metric LowCardinality(String),
    ts DateTime64(3, 'UTC'),
    value Float64,
    billable Bool,
    dims Map(LowCardinality(String), String),
    tags Array(LowCardinality(String))
) ENGINE = MergeTree ORDER BY (account, metric, ts)
"""
# The rows come as the TSV the PostgreSQL peer copies (render.tsv); ClickHouse converts them.
INSERT = """
INSERT INTO bench.events
SELECT account, key, metric, parseDateTime64BestEffort(ts, 3, 'UTC'), value, billable = 't',
       JSONExtract(dims, 'Map(String, String)'),
       arrayFilter(x -> x != '', splitByChar(',', trim(BOTH '{{}}' FROM tags)))
FROM file({path}, 'TSV', 'account String, key String, metric String, ts String, value Float64,
          billable String, dims String, tags String')
"""
AGGREGATES = {
    "count": "count()",
    "sum": "sum(value)",
    "unique_count": "uniqExact(dims[{unique}])",
    "latest": "argMax(value, ts)",
}
STARTS = {"day": "toStartOfDay", "hour": "toStartOfHour"}
SETTINGS = "SETTINGS group_by_use_nulls = 1, output_format_json_quote_64bit_integers = 0"


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql(q: Question) -> str:
    """The peer's query: one scan, buckets and totals together through GROUPING SETS."""
    where = [
        f"account = {_literal(q.account)}",
        f"metric = {_literal(q.metric)}",
        f"ts >= fromUnixTimestamp64Milli({q.start_ms}, 'UTC')",
        f"ts < fromUnixTimestamp64Milli({q.end_ms}, 'UTC')",
    ]
    if q.key is not None:
        where.append(f"key = {_literal(q.key)}")
    if q.billable:
        where.append("billable")
    if q.tags:
        where.append(f"hasAll(tags, [{', '.join(_literal(t) for t in q.tags)}])")
    group = f", dims[{_literal(q.group_by)}] AS g" if q.group_by else ""
    agg = AGGREGATES[q.aggregation].format(unique=_literal(q.unique_dimension or ""))
    sets = "(b, g), (g), ()" if q.group_by else "(b), ()"
    return (
        f"SELECT toUnixTimestamp(b) AS start, {'g' if q.group_by else 'NULL'}, {agg} AS v FROM ("
        f"SELECT {STARTS[q.granularity]}(ts, {_literal(q.tz)}) AS b{group}, ts, value, dims"
        f" FROM bench.events WHERE {' AND '.join(where)}"
        f") GROUP BY GROUPING SETS ({sets}) {SETTINGS}"
    )


class ChdbPeer:
    name = "chDB"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="usagemeter-bench-chdb-"))
        self.sess = session.Session(str(self.root / "db"))
        self.sess.query("CREATE DATABASE IF NOT EXISTS bench")
        self.sess.query(SCHEMA)

    @property
    def version(self) -> str:
        return f"{chdb.__version__} (ClickHouse {self.query('SELECT version()')[0][0]})"

    def query(self, text: str) -> list[list[Any]]:
        result = self.sess.query(text, "JSONCompact")
        if result.has_error():
            raise RuntimeError(result.error_message())
        raw = result.bytes()
        return json.loads(raw)["data"] if raw else []

    def load(self, tsv: bytes) -> float:
        """Insert rows (see render.tsv) through a temporary file; returns seconds taken."""
        path = self.root / "load.tsv"
        t0 = time.perf_counter()
        path.write_bytes(tsv)
        self.sess.query(INSERT.format(path=_literal(str(path))))
        self.sess.query("OPTIMIZE TABLE bench.events FINAL")
        path.unlink()
        return time.perf_counter() - t0

    def count(self) -> int:
        return int(self.query("SELECT count() FROM bench.events")[0][0])

    def restart(self) -> None:
        """In-process: nothing to restart; the first query is as cold as it gets."""

    def run(self, q: Question) -> list[list[Any]]:
        return self.query(sql(q))

    def answer(self, q: Question, rows: list[list[Any]]) -> Answer:
        out = Answer()
        for start, g, v in rows:
            value = None if v is None else float(v)
            if start is not None:
                out.add_bucket(max(int(start) * 1000, q.start_ms), group_of(q, g), value)
            elif g is not None or not q.group_by:
                out.add_total(group_of(q, g), value)
            if start is None and g is None:
                out.total = value or 0.0
        return out

    def close(self) -> None:
        self.sess.close()
        shutil.rmtree(self.root, ignore_errors=True)
