"""What only the PostgreSQL store has: its interned names, shared by every process, and the
batch statement's binary columns."""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tests.conftest import empty_postgres, make_database
from usagemeter.api.app import create_app
from usagemeter.auth import authenticate, issue_key
from usagemeter.model import Account, ApiKey, Event, Scope
from usagemeter.store import pgarrays
from usagemeter.store.base import OVERALL, TOTAL, AggregateSpec, Measure, Window
from usagemeter.store.postgres import PostgresStore, _digest

T = TypeVar("T")
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
    value=st.one_of(st.integers(-(10**15), 10**15), st.floats(), st.booleans()),
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
    # every retry of an event stored before as a conflict. (Its text is json's, written by
    # hand: NaN, infinities and a bool where a number was expected take json's own way.)
    event = Event("e", "a", metric, ts, value, billable, key, dims, tags)
    text = json.dumps(
        [metric, ts, value, billable, key, sorted(dims.items()), sorted(tags)],
        separators=(",", ":"),
    )
    assert _digest(event) == hashlib.blake2b(text.encode(), digest_size=16).digest()


def _request(fn: Callable[[], T]) -> T:
    """``fn`` in a context of its own, as one HTTP request runs (an asyncio task)."""
    return contextvars.copy_context().run(fn)


def test_a_request_reads_accounts_and_keys_as_of_its_key_lookup_and_no_longer(
    stores: tuple[PostgresStore, PostgresStore], postgres_url: str
) -> None:
    first, second = stores
    _, secret = issue_key(first, "a", key_id="ka", scopes=[Scope.READ])

    def read() -> tuple[str, list[str], ApiKey]:
        assert authenticate(second, secret) is not None
        return second.get_account("a").name, second.descendants("a"), second.get_key("ka")

    assert _request(read)[:2] == ("A", ["a"])
    # Changed behind the store's back, without moving the version (triggers off): a later
    # request still answers from what was read, so what it keeps is really used...
    with psycopg.connect(postgres_url, autocommit=True) as side:
        side.execute("SET session_replication_role = replica")
        side.execute("UPDATE accounts SET name = 'renamed quietly' WHERE id = 'a'")
    assert _request(read)[0] == "A"
    # ...and any change made as usual, through another process, is seen by the next request.
    first.create_account(Account("b", "B", "a"))
    name, tree, key = _request(read)
    assert (name, tree, key.revoked_at) == ("renamed quietly", ["a", "b"], None)
    first.revoke_key("ka")
    assert _request(lambda: authenticate(second, secret)) is None
    assert _request(lambda: second.get_key("ka")).revoked_at is not None


def test_a_request_sees_its_own_changes_to_what_it_read(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    first, _ = stores
    _, secret = issue_key(first, "a", key_id="ka", scopes=[Scope.READ])
    _, other = issue_key(first, "a", key_id="kb", scopes=[Scope.READ])

    def revoke_then_read() -> None:
        assert authenticate(first, secret) is not None
        assert first.get_key("kb").revoked_at is None and first.descendants("a") == ["a"]
        first.revoke_key("kb")
        first.create_account(Account("b", "B", "a"))
        assert first.get_key("kb").revoked_at is not None
        assert first.descendants("a") == ["a", "b"]

    _request(revoke_then_read)
    assert _request(lambda: authenticate(first, other)) is None


def test_a_key_revoked_through_one_server_is_refused_by_the_other_at_its_next_request(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = stores
    _, secret = issue_key(first, "a", key_id="ka", scopes=[Scope.READ])
    headers = {"Authorization": f"Bearer {secret}"}
    params = {"metric": "m", "account": "a", "start": "2025-01-01", "end": "2025-01-02"}
    with TestClient(create_app(second)) as two:
        for _ in range(2):  # the second time, what the first read is kept
            assert two.get("/v1/query", params=params, headers=headers).status_code == 200
        first.revoke_key("ka")
        assert two.get("/v1/query", params=params, headers=headers).status_code == 401


@settings(max_examples=40, deadline=None)
@given(
    small=st.lists(st.integers(-(2**15), 2**15 - 1), max_size=30),
    ints=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=30),
    bigs=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30),
    floats=st.lists(st.one_of(st.floats(allow_nan=False), st.integers(-(2**53), 2**53))),
    texts=st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\x00"))),
    digests=st.lists(st.binary(min_size=16, max_size=16), max_size=30),
)
def test_packed_arrays_arrive_as_the_values_packed(
    postgres_url: str,
    small: list[int],
    ints: list[int],
    bigs: list[int],
    floats: list[float],
    texts: list[str],
    digests: list[bytes],
) -> None:
    # The batch statement's columns are packed by hand in PostgreSQL's binary array format:
    # what the server reads must be each value, in order, of the declared type.
    columns = [
        ("int2", pgarrays.numbers("int2", small), small),
        ("int4", pgarrays.numbers("int4", ints), ints),
        ("int8", pgarrays.numbers("int8", bigs), bigs),
        ("float8", pgarrays.numbers("float8", floats), [float(f) for f in floats]),
        ("text", pgarrays.texts(texts), texts),
        ("bytea", pgarrays.fixed_bytes(digests, 16), digests),
    ]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        pgarrays.register(conn)
        for kind, packed, values in columns:
            row = conn.execute(
                f"SELECT pg_typeof(%b) = '{kind}[]'::regtype,"
                f" coalesce(array_agg(v ORDER BY n), '{{}}')"
                f" FROM unnest(%b::{kind}[]) WITH ORDINALITY AS u(v, n)",
                (packed, packed),
            ).fetchone()
            assert row is not None
            assert row[0], kind
            assert [bytes(v) if kind == "bytea" else v for v in row[1]] == values


def test_a_digest_of_another_length_is_refused_before_it_is_packed() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        pgarrays.fixed_bytes([b"x" * 16, b"y" * 15], 16)


def test_a_database_without_latest_seqs_gains_them_and_its_rows_rank_as_earliest(
    postgres_server: str,
) -> None:
    """A database written before rollup rows kept their latest event's seq opens with the
    column added (0 in its rows): a later event of another cell (dimension set, key) at the
    same millisecond wins over such a row, one a millisecond before loses, whether it waits
    or is folded, in the slots, the key hours and days, the hours and days."""
    url = make_database(postgres_server, "usagemeter_latest_seqs")
    at = BASE_MS + 7
    store = PostgresStore(url, pool_size=2, background_fold=False)
    for account in ("a", "b"):
        store.create_account(Account(account, account.upper()))
    issue_key(store, "a", key_id="ka", scopes=[Scope.READ])
    store.append([Event("e1", "a", "m", at, 5.0), Event("e2", "b", "m", at, 5.0)])
    store.fold(wait=True)
    with store._pool.connection() as conn:
        for table in ("rollup", "rollup_hour_key", "rollup_day_key", "rollup_hour", "rollup_day"):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN last_seq")
    store.close()
    store = PostgresStore(url, pool_size=2, background_fold=False)
    try:
        store.append(
            [
                Event("e3", "a", "m", at, 9.0, key_id="ka", dimensions={"status": "500"}),
                Event("e4", "b", "m", at - 1, 8.0, dimensions={"status": "500"}),
            ]
        )
        windows = (Window(0, BASE_MS, BASE_MS + DAY_MS), Window(1, BASE_MS + 1, BASE_MS + 9))
        for folded in (False, True):
            if folded:
                store.fold(wait=True)
            for window in windows:
                for group_by in ((), ("key",), ("status",)):
                    for account, latest in (("a", 9.0), ("b", 5.0)):
                        spec = AggregateSpec(
                            (account,), "m", (window,), (Measure("latest"),), group_by, totals=True
                        )
                        rows = {(r.window, r.group): r.values[0] for r in store.aggregate(spec)}
                        whole = rows[(OVERALL, ())] if group_by else rows[(TOTAL, ())]
                        assert whole == latest, (folded, window, group_by, account)
    finally:
        store.close()
