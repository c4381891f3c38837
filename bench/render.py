"""Generated events rendered for each system: JSON batches for ours, TSV for the peers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache

import numpy as np

from bench import generate as g


@cache
def _dims_json(metric: int, account: int, dim: int, dim2: int) -> str:
    return json.dumps(g.dimensions(metric, account, dim, dim2), separators=(",", ":"))


@cache
def _tags_json(mask: int) -> str:
    return json.dumps(g.tag_names(mask), separators=(",", ":"))


@cache
def _tags_pg(mask: int) -> str:
    return "{" + ",".join(g.tag_names(mask)) + "}"


_METRIC_NAMES = [f'"metric":"{m}"' for m in g.METRICS]


def rows(events: g.Events, start_ms: int) -> Iterator[tuple[int, ...]]:
    """Per event, as plain ints: (id number, ts in epoch ms, account, key, metric, value,
    billable, dim, dim2, tag mask)."""
    return zip(
        range(events.first, events.first + len(events)),
        (events.ts + start_ms).tolist(),
        events.account.tolist(),
        events.key.tolist(),
        events.metric.tolist(),
        events.value.tolist(),
        events.billable.tolist(),
        events.dim.tolist(),
        events.dim2.tolist(),
        events.tags.tolist(),
        strict=True,
    )


def event_json(events: g.Events, start_ms: int) -> list[str]:
    """One compact JSON object per event, in order; the event id is its global index."""
    out = []
    accounts = [g.account_id(a) for a in range(g.ACCOUNTS)]
    keys = [[g.key_id(a, k) for k in range(g.KEYS_PER_ACCOUNT)] for a in range(g.ACCOUNTS)]
    for i, ts, a, k, m, value, billable, dim, dim2, tags in rows(events, start_ms):
        out.append(
            f'{{"id":"e{i}","account":"{accounts[a]}","key":"{keys[a][k]}",{_METRIC_NAMES[m]},'
            f'"ts":{ts},"value":{value},"billable":{"true" if billable else "false"},'
            f'"dimensions":{_dims_json(m, a, dim, dim2)},"tags":{_tags_json(tags)}}}'
        )
    return out


def json_batches(events: g.Events, start_ms: int, batch: int) -> list[bytes]:
    """Request bodies for `POST /v1/events`: JSON arrays of `batch` events each."""
    lines = event_json(events, start_ms)
    return [
        ("[" + ",".join(lines[i : i + batch]) + "]").encode() for i in range(0, len(lines), batch)
    ]


TSV_COLUMNS = ("account", "key", "metric", "ts", "value", "billable", "dims", "tags")


def tsv(events: g.Events, start_ms: int) -> bytes:
    """Rows for the peers, in PostgreSQL COPY text format (also read by ClickHouse as TSV).

    Columns are TSV_COLUMNS; ts is ISO 8601 UTC with milliseconds; dims a JSON object; tags a
    PostgreSQL array literal ({a,b}). No value contains a tab, newline or backslash.
    """
    ts = np.datetime_as_string((events.ts + start_ms).astype("datetime64[ms]"), unit="ms")
    accounts = [g.account_id(a) for a in range(g.ACCOUNTS)]
    rows = []
    cols = zip(
        ts.tolist(),
        events.account.tolist(),
        events.key.tolist(),
        events.metric.tolist(),
        events.value.tolist(),
        events.billable.tolist(),
        events.dim.tolist(),
        events.dim2.tolist(),
        events.tags.tolist(),
        strict=True,
    )
    for t, a, k, m, value, billable, dim, dim2, tags in cols:
        rows.append(
            f"{accounts[a]}\t{g.key_id(a, k)}\t{g.METRICS[m]}\t{t}Z\t{value}\t"
            f"{'t' if billable else 'f'}\t{_dims_json(m, a, dim, dim2)}\t{_tags_pg(tags)}\n"
        )
    return "".join(rows).encode()
