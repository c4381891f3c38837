"""A deterministic generator of realistic usage events, cached under bench/data/.

Events are drawn independently from one fixed distribution, in chunks of CHUNK events, each
chunk from its own seeded generator. So the first N events of the stream are the same whatever
the total size asked for, and any prefix is a fair sample of the whole: the scale runs load the
prefix of 1M events, measure, load the rest up to 10M, measure again.

Volume per account is Zipf-skewed (s = 1 over 1,000 accounts: the heaviest holds ~13% of all
events, 1.3M at 10M). Timestamps are stored as milliseconds from the start of the 120-day
window, and become absolute only when rendered, against an anchor date (the window's end).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
FORMAT = "v1"  # bump when the distribution changes, so stale caches are not reused
CHUNK = 1_000_000
ACCOUNTS = 1_000
KEYS_PER_ACCOUNT = 5
DAYS = 120
DAY_MS = 86_400_000

METRICS = (
    "lookups",
    "requests",
    "actions",
    "ApiCalls",
    "Events",
    "conversations",
    "BotAnalyses",
    "Sessions",
    "StorageBytes",
)
METRIC_WEIGHTS = (0.30, 0.25, 0.15, 0.08, 0.07, 0.05, 0.04, 0.04, 0.02)
KEY_WEIGHTS = (0.45, 0.25, 0.15, 0.10, 0.05)
TAGS = ("prod", "web", "mobile", "batch", "eu", "us", "beta", "internal")
TAG_WEIGHTS = (8.0, 5.0, 4.0, 2.0, 2.0, 2.0, 1.0, 1.0)
TAG_COUNT_WEIGHTS = (0.30, 0.35, 0.25, 0.10)  # 0, 1, 2 or 3 tags
SOURCES = ("app", "api")
SOURCE_WEIGHTS = (0.7, 0.3)
STATUSES = ("200", "201", "204", "400", "401", "404", "429", "500", "503")
STATUS_WEIGHTS = (0.80, 0.05, 0.03, 0.03, 0.02, 0.04, 0.01, 0.015, 0.005)
LICENSEES_PER_ACCOUNT = 4
AGENTS = 8
CONVERSATION_TYPES = ("inbound", "outbound", "web")
SESSION_POOL = 5_000
LOOKUP_BILLABLE_SHARE = 0.9
COLUMNS = ("ts", "account", "key", "metric", "value", "billable", "dim", "dim2", "tags")


@dataclass(frozen=True)
class Events:
    """Columns of a run of events; row i has the global index `first + i` (its event id)."""

    first: int
    ts: np.ndarray  # int64 ms from the window start
    account: np.ndarray  # int16, 0-based; account 0 is the heaviest
    key: np.ndarray  # int8, 0..KEYS_PER_ACCOUNT-1
    metric: np.ndarray  # int8, index into METRICS
    value: np.ndarray  # int64
    billable: np.ndarray  # bool
    dim: np.ndarray  # int32: source, licensee, status, agent or session index, per metric
    dim2: np.ndarray  # int8: conversation type
    tags: np.ndarray  # uint8 bit mask over TAGS

    def __len__(self) -> int:
        return len(self.ts)

    def head(self, n: int) -> Events:
        cols = {name: getattr(self, name)[:n] for name in COLUMNS}
        return Events(first=self.first, **cols)


def account_weights() -> np.ndarray:
    ranks = np.arange(1, ACCOUNTS + 1, dtype=np.float64)
    w = 1.0 / ranks
    return w / w.sum()


def _normalised(weights: tuple[float, ...]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def _day_weights() -> np.ndarray:
    """Growth over the window (+50%) and a weekly dip (two quiet days in seven)."""
    day = np.arange(DAYS)
    w = (1.0 + 0.5 * day / (DAYS - 1)) * np.where(day % 7 >= 5, 0.6, 1.0)
    return w / w.sum()


def _minute_weights() -> np.ndarray:
    """A diurnal curve peaking mid-afternoon UTC, never below a third of the peak."""
    minute = np.arange(1440)
    w = 0.65 + 0.35 * np.cos((minute - 15 * 60) / 1440 * 2 * np.pi)
    return w / w.sum()


def _draw(rng: np.random.Generator, p: np.ndarray, n: int, dtype: type) -> np.ndarray:
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(n), side="right").astype(dtype)


def _tags(rng: np.random.Generator, n: int) -> np.ndarray:
    """0-3 distinct tags per event, common tags more likely (weighted sampling, no repeats)."""
    count = _draw(rng, _normalised(TAG_COUNT_WEIGHTS), n, np.int8)
    # Efraimidis-Spirakis: the k largest u ** (1 / w) are a weighted sample without replacement.
    scores = rng.random((n, len(TAGS))) ** (1.0 / np.asarray(TAG_WEIGHTS))
    rank = np.argsort(np.argsort(-scores, axis=1), axis=1)
    chosen = rank < count[:, None]
    bits = (1 << np.arange(len(TAGS))).astype(np.uint8)
    return (chosen * bits).sum(axis=1).astype(np.uint8)


def generate_chunk(seed: int, index: int) -> Events:
    """Chunk `index` of the stream: CHUNK events from a generator seeded by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    n = CHUNK
    account = _draw(rng, account_weights(), n, np.int16)
    key = _draw(rng, _normalised(KEY_WEIGHTS), n, np.int8)
    metric = _draw(rng, _normalised(METRIC_WEIGHTS), n, np.int8)
    day = _draw(rng, _day_weights(), n, np.int64)
    minute = _draw(rng, _minute_weights(), n, np.int64)
    ts = day * DAY_MS + minute * 60_000 + rng.integers(0, 60_000, n)

    m = {name: metric == i for i, name in enumerate(METRICS)}
    dim = np.full(n, -1, dtype=np.int32)
    dim2 = np.full(n, -1, dtype=np.int8)
    dim[m["actions"]] = _draw(rng, _normalised(SOURCE_WEIGHTS), int(m["actions"].sum()), np.int32)
    dim[m["lookups"]] = rng.integers(0, LICENSEES_PER_ACCOUNT, int(m["lookups"].sum()))
    dim[m["requests"]] = _draw(rng, _normalised(STATUS_WEIGHTS), int(m["requests"].sum()), np.int32)
    conv = m["conversations"]
    dim[conv] = rng.integers(0, AGENTS, int(conv.sum()))
    dim2[conv] = rng.integers(0, len(CONVERSATION_TYPES), int(conv.sum()))
    dim[m["Sessions"]] = rng.integers(0, SESSION_POOL, int(m["Sessions"].sum()))

    value = np.ones(n, dtype=np.int64)
    for name in ("ApiCalls", "Events", "BotAnalyses"):
        value[m[name]] = rng.geometric(0.2, int(m[name].sum()))
    value[conv] = 5 + rng.geometric(1 / 120, int(conv.sum()))
    # A gauge: a function of (account, ts) only, so two reports at the same millisecond agree
    # and "latest" has one answer.
    storage = m["StorageBytes"]
    value[storage] = (account[storage].astype(np.int64) + 1) * 1_000_000_000 + ts[storage] // 1000

    billable = np.ones(n, dtype=bool)
    billable[m["lookups"]] = rng.random(int(m["lookups"].sum())) < LOOKUP_BILLABLE_SHARE
    return Events(
        first=index * CHUNK,
        ts=ts,
        account=account,
        key=key,
        metric=metric,
        value=value,
        billable=billable,
        dim=dim,
        dim2=dim2,
        tags=_tags(rng, n),
    )


def _cache_path(seed: int, index: int) -> Path:
    return DATA_DIR / f"events-{FORMAT}-s{seed}-{index:04d}.npz"


def load_chunk(seed: int, index: int) -> Events:
    """A chunk from the cache, generated and cached on first use."""
    path = _cache_path(seed, index)
    if path.exists():
        with np.load(path) as f:
            return Events(first=index * CHUNK, **{name: f[name] for name in COLUMNS})
    events = generate_chunk(seed, index)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{name: getattr(events, name) for name in COLUMNS})
    tmp.replace(path)
    return events


def iter_events(seed: int, start: int, stop: int, size: int = CHUNK) -> Iterator[Events]:
    """Events [start, stop) of the stream, in pieces of at most `size` that never span chunks."""
    pos = start
    while pos < stop:
        index = pos // CHUNK
        chunk = load_chunk(seed, index)
        lo = pos - index * CHUNK
        hi = min(stop - index * CHUNK, CHUNK, lo + size)
        cols = {name: getattr(chunk, name)[lo:hi] for name in COLUMNS}
        yield Events(first=pos, **cols)
        pos += hi - lo


def concat(parts: list[Events]) -> Events:
    cols = {name: np.concatenate([getattr(p, name) for p in parts]) for name in COLUMNS}
    return Events(first=parts[0].first if parts else 0, **cols)


def all_events(seed: int, stop: int) -> Events:
    return concat(list(iter_events(seed, 0, stop)))


# Names: what the events say on the wire.


def account_id(account: int) -> str:
    return f"acct_{account + 1:04d}"


def key_id(account: int, key: int) -> str:
    return f"key_{account + 1:04d}_{key + 1}"


def licensee(account: int, index: int) -> str:
    return f"sl_{account + 1:04d}_{index}"


def tag_names(mask: int) -> list[str]:
    return [name for bit, name in enumerate(TAGS) if mask >> bit & 1]


def dimensions(metric: int, account: int, dim: int, dim2: int) -> dict[str, str]:
    name = METRICS[metric]
    if name == "actions":
        return {"source": SOURCES[dim]}
    if name == "lookups":
        return {"licensee": licensee(account, dim)}
    if name == "requests":
        return {"status": STATUSES[dim]}
    if name == "conversations":
        return {"agent": f"agent_{dim + 1}", "type": CONVERSATION_TYPES[dim2]}
    if name == "Sessions":
        return {"session_id": f"s{dim}"}
    return {}


def window_start_ms(anchor: dt.date) -> int:
    """Epoch ms of the window start: DAYS days before the anchor date, at 00:00 UTC."""
    start = dt.datetime(anchor.year, anchor.month, anchor.day, tzinfo=dt.UTC)
    return int(start.timestamp() * 1000) - DAYS * DAY_MS
