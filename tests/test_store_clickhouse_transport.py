"""The chDB transport's INSERT block: every value of an event arrives exactly as sent.
Events with any text the model allows (quotes, backslashes, emoji, every plane in ids,
dimension values and tags; the empty string in dimension values), many or no dimensions and
tags, values at the model's bounds (±0, subnormals, ±1e15), timestamps over the model's
range (none before 1970 is accepted), set ids above 2**63 and key ids null or set go
through a chDB store and a SQLite store: the events listed back are the ones sent, each
value stored bit for bit, the set ids stored are the ones Python computed, and every answer
(per 15-minute slot, grouped by a dimension, filtered by a tag, a key or billable; counts,
minimums, maximums and latest values over all) is SQLite's."""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usagemeter.ingest import RESERVED_DIMENSIONS
from usagemeter.model import Account, ApiKey, Event, Scope
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.chappend import set_id
from usagemeter.store.chtransport import literal
from usagemeter.store.clickhouse import ClickHouseStore
from usagemeter.store.sqlite import SQLiteStore

SLOT_MS = 900_000
# The model's bounds (ingest.MIN_TS_MS, MAX_TS_MS): 2000-01-01 to 2200-01-01. No instant
# before 1970 is accepted.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 7_258_118_400_000
MAX_VALUE = 1e15  # ingest.MAX_VALUE
_accounts = itertools.count()

# No NUL: the model refuses it in any text (ingest.NUL).
_char = st.characters(codec="utf-8", blacklist_characters="\x00")
text = st.text(_char, min_size=1, max_size=10)
# Quotes, backslashes, an emoji, a combining mark, a right-to-left letter, JSON's escapes.
_TRICKY = ["'", '"', "\\", "\\'", "😀", "e\u0301", "\u05d0", "\\u0000", "\n\t", "a b"]
tricky = st.one_of(st.sampled_from(_TRICKY), text)
# The model's names: metrics and dimension names of letters, digits and _ . : - (ingest.NAME,
# ingest.DIMENSION; any text in them is the ingest tests'), tags without a comma.
name = st.from_regex(r"[A-Za-z0-9_.\-]{1,12}", fullmatch=True).filter(
    lambda n: n not in RESERVED_DIMENSIONS
)
tag = tricky.filter(lambda t: "," not in t)
# The dimension every event may carry, grouped by below.
GROUP_KEY = "status.code-1_x"


def _high_set() -> dict[str, str]:
    """A dimension set whose id is above 2**63: a UInt64 that a signed column would refuse."""
    for n in itertools.count():
        dims = {GROUP_KEY: f"high-{n}"}
        if set_id(tuple(sorted(dims.items()))) >= 2**63:
            return dims
    raise AssertionError("unreachable")


HIGH_SET = _high_set()

values = st.one_of(
    st.sampled_from(
        [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, MAX_VALUE, -MAX_VALUE, 0.1, 1 / 3]
    ),
    st.floats(-MAX_VALUE, MAX_VALUE, allow_nan=False, allow_subnormal=True),
)
dimensions = st.one_of(
    st.just(HIGH_SET),
    st.dictionaries(name, st.one_of(st.just(""), tricky), max_size=6),
    st.builds(
        lambda value, rest: {**rest, GROUP_KEY: value},
        st.one_of(st.just(""), tricky),
        st.dictionaries(name, tricky, max_size=3),
    ),
)
event_fields = st.fixed_dictionaries(
    {
        "id": tricky,
        "metric": st.sampled_from(["requests", "m.x:y-Z_9"]),
        "slot": st.integers(MIN_TS_MS // SLOT_MS, MAX_TS_MS // SLOT_MS - 1),
        "offset": st.integers(0, SLOT_MS - 1),
        "value": values,
        "billable": st.booleans(),
        "key": st.sampled_from([None, "key'\\😀", "plain"]),
        "dimensions": dimensions,
        "tags": st.frozensets(tag, max_size=6),
    }
)


@pytest.fixture
def two_stores(
    tmp_path: Path, chstore: ClickHouseStore
) -> Iterator[tuple[ClickHouseStore, SQLiteStore]]:
    sqlite = SQLiteStore(tmp_path / "same.db")
    yield chstore, sqlite
    sqlite.close()


def _bits(value: float) -> int:
    """A value's every bit, its sign too (-0.0 is not 0.0 here)."""
    bits: int = struct.unpack("<Q", struct.pack("<d", value))[0]
    return bits


def _fields(e: Event) -> tuple[object, ...]:
    return (
        e.account_id,
        e.id,
        e.metric,
        e.ts_ms,
        e.value,
        e.billable,
        e.key_id,
        sorted(e.dimensions.items()),
        sorted(e.tags),
    )


def _create(store: ClickHouseStore | SQLiteStore, account: str) -> None:
    store.create_account(Account(account, account))
    for key in ("key'\\😀", "plain"):
        store.create_key(
            ApiKey(
                f"{account}/{key}",
                account,
                key,
                "um_",
                frozenset({Scope.INGEST}),
                datetime(2025, 1, 1, tzinfo=UTC),
            ),
            hashlib.sha256(f"{account}/{key}".encode()).digest(),  # unique, as a secret's is
        )


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fields=st.lists(
        event_fields, min_size=1, max_size=40, unique_by=(lambda f: f["id"], lambda f: f["slot"])
    )
)
def test_every_value_arrives_exactly_as_sent_and_answers_as_on_sqlite(
    two_stores: tuple[ClickHouseStore, SQLiteStore], fields: list[dict[str, object]]
) -> None:
    chstore, sqlite = two_stores
    account = f"t'\\😀-{next(_accounts)}"
    sent = [
        Event(
            id=str(f["id"]),
            account_id=account,
            metric=str(f["metric"]),
            ts_ms=int(f["slot"]) * SLOT_MS + int(f["offset"]),  # type: ignore[call-overload]
            value=f["value"],  # type: ignore[arg-type]
            billable=bool(f["billable"]),
            key_id=None if f["key"] is None else f"{account}/{f['key']}",
            dimensions=f["dimensions"],  # type: ignore[arg-type]
            tags=f["tags"],  # type: ignore[arg-type]
        )
        for f in fields
    ]
    for store in (chstore, sqlite):
        _create(store, account)
        assert store.append(sent).accepted == len(sent)

    # Listed back as sent.
    assert sorted(map(_fields, chstore.iter_events([account]))) == sorted(map(_fields, sent))

    # As stored: each value's bits (the sign of -0.0, every subnormal), and the set ids as
    # Python made them, above 2**63 too (UInt64 end to end). (A listing reads -0.0 back as
    # 0.0: ClickHouse writes it "-0" in JSON, an integer to the decoder.)
    stored = chstore.transport.query(
        "SELECT id, reinterpretAsUInt64(value), dimset, tagset FROM events"
        f" WHERE account = {literal(account)}"
    )
    expected = {
        e.id: [
            _bits(e.value),
            set_id(tuple(sorted(e.dimensions.items()))),
            set_id(tuple(sorted(e.tags))),
        ]
        for e in sent
    }
    assert {row[0]: [int(v) for v in row[1:]] for row in stored} == expected

    # Every answer SQLite gives: one event per slot, so each cell's sum is exact in any order.
    exact = (Measure("count"), Measure("sum"), Measure("min"), Measure("max"), Measure("latest"))
    whole = (Window(0, MIN_TS_MS, MAX_TS_MS),)
    for metric in sorted({e.metric for e in sent}):
        slots = tuple(
            Window(i, ts - ts % SLOT_MS, ts - ts % SLOT_MS + SLOT_MS)
            for i, ts in enumerate(sorted(e.ts_ms for e in sent if e.metric == metric))
        )
        tag = next((t for e in sent for t in sorted(e.tags)), "none")
        asked = [
            AggregateSpec((account,), metric, slots, exact),
            AggregateSpec((account,), metric, slots, exact, group_by=(GROUP_KEY,)),
            AggregateSpec((account,), metric, slots, exact, tags=frozenset({tag})),
            AggregateSpec((account,), metric, slots, exact, billable=True),
            AggregateSpec((account,), metric, slots, exact, key_id=f"{account}/key'\\😀"),
            AggregateSpec(
                (account,),
                metric,
                whole,
                (Measure("count"), Measure("min"), Measure("max"), Measure("latest")),
                group_by=(GROUP_KEY,),
                totals=True,
            ),
        ]
        for spec in asked:
            answers = [
                sorted(((r.window, r.group, r.values) for r in s.aggregate(spec)), key=repr)
                for s in (chstore, sqlite)
            ]
            assert answers[0] == answers[1], spec
