"""The embedded store's deferred fold: acknowledged events wait in ``unfolded`` until a long
run folds them, and every question reads the rollups and the waiting events together."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.reference import fold_cells
from usagemeter.corrections import VoidSelector
from usagemeter.model import Account, Event
from usagemeter.store import sqlite as sqlite_module
from usagemeter.store.base import TOTAL, AggregateSpec, Measure, Window
from usagemeter.store.sqlite import SQLiteStore

BASE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MEASURES = tuple(Measure(a) for a in ("count", "sum", "min", "max", "latest"))
# Few distinct timestamps, so that latest values tie, between a folded and a waiting event
# as much as between two waiting ones; hour and day edges, and the ragged window's ends.
OFFSETS = (0, 1, 1233, 1234, HOUR_MS - 1, HOUR_MS, 5 * HOUR_MS, DAY_MS + 5, 47 * HOUR_MS)
RAGGED = Window(0, BASE_MS + 1234, BASE_MS + 47 * HOUR_MS)
SPECS = (
    tuple(Window(h, BASE_MS + h * HOUR_MS, BASE_MS + (h + 1) * HOUR_MS) for h in range(48)),
    (RAGGED,),
    (Window(0, BASE_MS, BASE_MS + 2 * DAY_MS),),
)


def _open(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    for account in ("a", "b"):
        if not any(a.id == account for a in store.list_accounts()):
            store.create_account(Account(account, account.upper()))
    return store


def _answers(store: SQLiteStore, account: str) -> list[dict[int, tuple]]:
    return [
        {
            row.window: row.values
            for row in store.aggregate(
                AggregateSpec((account,), "m", windows, MEASURES, totals=True)
            )
        }
        for windows in SPECS
    ]


def _expected(arrived: list[Event], account: str) -> list[dict[int, tuple]]:
    """Each spec's answer, folding the events one by one in the order they arrived."""
    return [fold_cells(arrived, windows, lambda e: e.account_id == account) for windows in SPECS]


def _waiting(store: SQLiteStore) -> int:
    with store._write_lock:  # the committer may be folding on this connection meanwhile
        return int(store._writer.execute("SELECT count(*) FROM unfolded").fetchone()[0])


steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"),
            st.lists(
                st.tuples(
                    st.sampled_from(["a", "b"]),
                    st.sampled_from(OFFSETS),
                    st.integers(-3, 9),
                    st.integers(0, 30),  # the id: a repeat counts once
                ),
                min_size=1,
                max_size=8,
            ),
        ),
        st.just(("fold", [])),
        st.just(("ask", [])),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=steps, fold_every=st.sampled_from([3, 10, 10**9]))
# A folded event and a waiting one at the same timestamp: the waiting one came later.
@example(
    steps=[
        ("append", [("a", 0, 5, 1)]),
        ("fold", []),
        ("append", [("a", 0, 2, 2)]),
        ("ask", []),
    ],
    fold_every=10**9,
)
# Two events at one timestamp read raw (the ragged window's start): the later one's value
# is the latest, whether they wait or were folded (the first of them won before).
@example(steps=[("append", [("a", 1234, 0, 1), ("a", 1234, 1, 0)])], fold_every=10**9)
@example(
    steps=[("append", [("a", 1234, 0, 1), ("a", 1234, 1, 0)]), ("fold", [])],
    fold_every=10**9,
)
def test_interleaved_appends_folds_and_questions_equal_folding_event_by_event(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    steps: list[tuple[str, list[tuple[str, int, int, int]]]],
    fold_every: int,
) -> None:
    monkeypatch.setattr(sqlite_module, "FOLD_EVENTS", fold_every)
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 3600.0)
    store = _open(tmp_path / f"defer-{os.urandom(4).hex()}.db")
    arrived: list[Event] = []
    seen: set[tuple[str, str]] = set()
    for action, sent in [*steps, ("ask", [])]:
        if action == "append":
            batch = {
                (account, f"e{n}"): Event(f"e{n}", account, "m", BASE_MS + offset, float(value))
                for account, offset, value, n in sent
            }
            store.append(list(batch.values()))
            arrived.extend(e for ident, e in batch.items() if ident not in seen)
            seen.update(batch)
        elif action == "fold":
            store.fold()
            assert _waiting(store) == 0
        else:
            for account in ("a", "b"):
                assert _answers(store, account) == _expected(arrived, account)
    store.close()


def test_a_question_reads_waiting_events_without_folding_them(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 3600.0)
    store = _open(db_path)
    store.append(
        [
            Event(f"e{i}", "a", "m", BASE_MS + i * HOUR_MS, 2.0, dimensions={"d": "x"})
            for i in range(3)
        ]
    )
    assert _answers(store, "a")[2] == {0: (3, 6.0, 2.0, 2.0, 2.0), TOTAL: (3, 6.0, 2.0, 2.0, 2.0)}
    assert _waiting(store) == 3  # answered from the waiting events: nothing folded
    assert store.metrics_seen(["a"]) == {"m": ["d"]}
    assert store.metrics_seen(["a"], dimensions=False) == {"m": []}
    assert store.metrics_seen(["b"]) == {}
    store.fold()
    assert _waiting(store) == 0
    assert _answers(store, "a")[2][0] == (3, 6.0, 2.0, 2.0, 2.0)
    assert store.metrics_seen(["a"]) == {"m": ["d"]}
    store.close()


def test_corrections_see_the_waiting_events(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A void, retention and an account's deletion each fold what waits first, so the
    rollups they correct hold the waiting events, and none waits twice after them."""
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 3600.0)
    store = _open(db_path)
    store.append([Event(f"e{i}", "a", "m", BASE_MS + i * HOUR_MS) for i in range(4)])
    store.append([Event(f"e{i}", "b", "m", BASE_MS + i * HOUR_MS) for i in range(4)])
    store.void_events(VoidSelector("a", ids=("e1",)), "wrong", None, 0)
    assert _waiting(store) == 0
    assert _answers(store, "a")[2][0][0] == 3
    store.append([Event("late", "a", "m", BASE_MS + 40 * HOUR_MS)])
    assert store.retain(BASE_MS + HOUR_MS) == 2  # e0 of both accounts; rollups stay
    assert _answers(store, "a")[2][0][0] == 4
    store.append([Event("later", "b", "m", BASE_MS + 41 * HOUR_MS)])
    store.delete_account("b")
    assert _waiting(store) == 0
    assert store.count_events() == 3  # a's e2, e3 and "late"
    assert [e.id for e in store.iter_events(["a"])] == ["e2", "e3", "late"]
    store.close()


_KILLED = """
import os, signal, sys
from usagemeter.model import Event
from usagemeter.store import sqlite as sqlite_module
from usagemeter.store.sqlite import SQLiteStore
sqlite_module.FOLD_EVENTS = 10**9
sqlite_module.IDLE_FOLD_SECONDS = 3600.0
store = SQLiteStore(sys.argv[1])
base = int(sys.argv[2])
store.append([Event(f"k{i}", "a", "m", base + i * 1000, 1.5) for i in range(50)])
waiting = store._writer.execute("SELECT count(*) FROM unfolded").fetchone()[0]
print(waiting, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_waiting_events_survive_sigkill_and_are_folded_when_the_file_is_opened(
    db_path: Path,
) -> None:
    _open(db_path).close()
    done = subprocess.run(
        [sys.executable, "-c", _KILLED, str(db_path), str(BASE_MS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -9 and done.stdout.strip() == "50"  # acknowledged, unfolded
    store = _open(db_path)
    assert _waiting(store) == 0  # folded when opened
    store.merge()
    folded = store._writer.execute("SELECT sum(cnt), sum(total) FROM rollup").fetchone()
    assert tuple(folded) == (50, 75.0)
    assert _answers(store, "a")[2][0][:2] == (50, 75.0)
    store.close()


def test_an_idle_store_folds_what_another_process_left_waiting(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "IDLE_FOLD_SECONDS", 0.05)
    server = _open(db_path)  # open before the events arrive: its opening folds none of them
    done = subprocess.run(
        [sys.executable, "-c", _KILLED, str(db_path), str(BASE_MS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -9 and done.stdout.strip() == "50"
    deadline = time.monotonic() + 20
    while _waiting(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _waiting(server) == 0
    assert server._writer.execute("SELECT sum(cnt) FROM rollup_recent").fetchone()[0] == 50
    server.close()
