"""The generator: deterministic, prefix-stable, and shaped as the issue asks."""

import datetime as dt

import numpy as np

from bench import generate as g
from bench import render


def test_same_seed_same_events_and_prefixes_agree() -> None:
    a = g.generate_chunk(7, 0)
    b = g.generate_chunk(7, 0)
    for name in g.COLUMNS:
        assert np.array_equal(getattr(a, name), getattr(b, name))
    head = next(g.iter_events(1, 0, 1000))
    assert np.array_equal(head.ts, g.load_chunk(1, 0).ts[:1000])
    assert [len(p) for p in g.iter_events(1, 999_000, 1_000_500, size=600)] == [600, 400, 500]
    assert not np.array_equal(g.generate_chunk(8, 0).ts, a.ts)


def test_shape_of_the_data() -> None:
    e = g.load_chunk(1, 0)
    counts = np.bincount(e.account, minlength=g.ACCOUNTS)
    assert counts[0] == counts.max()
    assert counts[0] > 0.1 * len(e)  # over 1M of 10M
    assert e.ts.min() >= 0 and e.ts.max() < g.DAYS * g.DAY_MS
    assert set(np.unique(e.key).tolist()) == set(range(g.KEYS_PER_ACCOUNT))
    tag_counts = np.unpackbits(e.tags[:, None], axis=1).sum(axis=1)
    assert set(np.unique(tag_counts).tolist()) == {0, 1, 2, 3}
    lookups = e.metric == g.METRICS.index("lookups")
    assert 0.85 < e.billable[lookups].mean() < 0.95
    assert e.billable[~lookups].all()


def test_gauge_is_a_function_of_account_and_time() -> None:
    e = g.load_chunk(1, 0)
    storage = e.metric == g.METRICS.index("StorageBytes")
    expect = (e.account[storage].astype(np.int64) + 1) * 1_000_000_000 + e.ts[storage] // 1000
    assert np.array_equal(e.value[storage], expect)


def test_rendered_forms_carry_the_same_event() -> None:
    events = next(g.iter_events(1, 0, 3))
    start = g.window_start_ms(dt.date(2026, 1, 1))
    (body,) = render.json_batches(events, start, 1000)
    import json

    first = json.loads(body)[0]
    row = render.tsv(events, start).decode().splitlines()[0].split("\t")
    assert first["id"] == "e0"
    assert row[0] == first["account"] and row[1] == first["key"] and row[2] == first["metric"]
    stamp = dt.datetime.fromisoformat(row[3]).timestamp() * 1000
    assert stamp == first["ts"]
    assert json.loads(row[6]) == first["dimensions"]
    assert row[7].strip("{}").split(",") == (first["tags"] or [""])
