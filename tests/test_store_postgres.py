"""What only the PostgreSQL store has: its interned names, shared by every process, and the
batch statement's binary columns."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import empty_postgres
from usagemeter.model import Account, Event
from usagemeter.store.base import AggregateSpec, Measure, Window
from usagemeter.store.postgres import PostgresStore, _digest

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
DAY_MS = 86_400_000


@contextmanager
def two_handles(
    url: str, accounts: Sequence[str], background_fold: bool = True
) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two handles on one database, emptied, with ``accounts``: two processes, as far as
    the store can tell."""
    first = PostgresStore(url, pool_size=2, background_fold=background_fold)
    empty_postgres(first)
    second = PostgresStore(url, pool_size=2, background_fold=background_fold)
    for account in accounts:
        first.create_account(Account(account, account.upper()))
    try:
        yield first, second
    finally:
        first.close()
        second.close()


@pytest.fixture
def stores(postgres_url: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    with two_handles(postgres_url, ["a"]) as pair:
        yield pair


names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=5)


_example = iter(range(10**9))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(dims=st.dictionaries(names, names, max_size=4), tags=st.frozensets(names, max_size=3))
def test_a_set_of_names_is_interned_once_whatever_its_order_or_process(
    stores: tuple[PostgresStore, PostgresStore], dims: dict[str, str], tags: frozenset[str]
) -> None:
    first, second = stores
    backwards = dict(reversed(list(dims.items())))
    ids = [f"e{next(_example)}" for _ in range(3)]
    for store, order, event_id in zip(
        (first, second, first), (dims, backwards, backwards), ids, strict=True
    ):
        store.append([Event(event_id, "a", "m", BASE_MS, dimensions=order, tags=tags)])
    with first._pool.connection() as conn:
        row = conn.execute(
            "SELECT count(DISTINCT dimset), count(DISTINCT tagset)"
            " FROM events e JOIN dimsets d ON d.id = e.dimset WHERE event_id = ANY(%s)",
            (ids,),
        ).fetchone()
    assert row is not None
    assert row[:2] == (1, 1)


def test_integer_and_float_values_go_in_one_batch(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = stores
    # JSON's 3 is an int: the batch's values are one float8 array all the same.
    mixed = [Event("i", "a", "m", BASE_MS, value=3), Event("f", "a", "m", BASE_MS, value=0.5)]
    assert first.append(mixed).accepted == 2
    spec = AggregateSpec(("a",), "m", (Window(0, BASE_MS, BASE_MS + DAY_MS),), (Measure("sum"),))
    assert [r.values for r in second.aggregate(spec)] == [(3.5,)]


@settings(max_examples=60, deadline=None)
@given(
    metric=names,
    ts=st.integers(-(2**42), 2**42),
    value=st.one_of(st.integers(-(10**15), 10**15), st.floats(-1e15, 1e15)),
    billable=st.booleans(),
    key=st.one_of(st.none(), names),
    dims=st.dictionaries(names, names, max_size=4),
    tags=st.frozensets(names, max_size=3),
)
def test_the_payload_digest_stays_the_one_stored_ids_were_given(
    metric: str,
    ts: int,
    value: float,
    billable: bool,
    key: str | None,
    dims: dict[str, str],
    tags: frozenset[str],
) -> None:
    # event_ids keeps each id's digest forever: a digest computed another way would report
    # every retry of an event stored before as a conflict.
    event = Event("e", "a", metric, ts, value, billable, key, dims, tags)
    text = json.dumps(
        [metric, ts, value, billable, key, sorted(dims.items()), sorted(tags)],
        separators=(",", ":"),
    )
    assert _digest(event) == hashlib.blake2b(text.encode(), digest_size=16).digest()
