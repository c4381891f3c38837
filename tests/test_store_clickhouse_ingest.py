"""The ClickHouse store's write path: events travel as columns (JSONColumns), so any text is
stored as sent and a retry of it is a duplicate, not a conflict; and a database whose tables
of sets were created partitioned by month (before round 6) takes batches as before."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_store_clickhouse_hours import _transport
from usagemeter.model import Account, Event
from usagemeter.store.chschema import HOUR_SETS, SLOTS
from usagemeter.store.clickhouse import ClickHouseStore

BASE_MS = 1_741_392_000_000  # 2025-03-08T00:00:00Z
DAY_MS = 86_400_000
_accounts = itertools.count()

# Any text a client may send: quotes, backslashes, newlines, tabs, NUL, any plane.
text = st.text(min_size=1, max_size=12)
event_fields = st.fixed_dictionaries(
    {
        "id": text,
        "metric": text,
        "ts_ms": st.integers(BASE_MS - 400 * DAY_MS, BASE_MS + 400 * DAY_MS),
        "value": st.floats(allow_nan=False, allow_infinity=False, width=64),
        "billable": st.booleans(),
        "dimensions": st.dictionaries(text, st.text(max_size=12), max_size=3),
        "tags": st.frozensets(text, max_size=3),
    }
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fields=st.lists(event_fields, min_size=1, max_size=30, unique_by=lambda f: f["id"]))
def test_any_text_is_stored_as_sent_and_a_retry_is_a_duplicate(
    chstore: ClickHouseStore, fields: list[dict[str, object]]
) -> None:
    account = f"acct-{next(_accounts)}"
    chstore.create_account(Account(account, account))
    sent = [Event(account_id=account, **f) for f in fields]  # type: ignore[arg-type]
    assert chstore.append(sent).accepted == len(sent)
    stored = list(chstore.iter_events([account]))
    assert sorted(stored, key=lambda e: e.id) == sorted(sent, key=lambda e: e.id)
    retry = chstore.append(sent)
    assert (retry.accepted, retry.duplicates, retry.conflicts) == (0, len(sent), ())
    cells = chstore.transport.query(
        f"SELECT sum(cnt) FROM rollup WHERE account = '{account}'"
        f" UNION ALL SELECT sum(cnt) FROM {HOUR_SETS} WHERE account = '{account}'"
    )
    assert [int(row[0]) for row in cells] == [len(sent), len(sent)]


def _partitioned(ddl: str, unit_ms: int) -> str:
    """A table of sets as created before round 6: a partition per UTC month."""
    month = f"toYYYYMM(toDateTime(intDiv(slot * {unit_ms}, 1000), 'UTC'))"
    return ddl.replace("ORDER BY", f"PARTITION BY {month}\nORDER BY", 1)


def test_tables_of_sets_partitioned_by_month_take_batches_as_before(
    clickhouse_home: str, tmp_path: Path
) -> None:
    database = f"partitioned_{time.time_ns()}"
    transport = _transport(clickhouse_home, database)
    for ddl, unit in ((SLOTS, 900_000), (SLOTS.replace("rollup", HOUR_SETS, 1), 3_600_000)):
        transport.command(_partitioned(ddl, unit))
    side = str(tmp_path / "side.sqlite")
    store = ClickHouseStore(transport, side)
    try:
        assert store.hour_sets.boundary == 0  # no events table yet: its view counts all
        store.create_account(Account("a", "A"))
        events = [
            Event(id=f"e{i}", account_id="a", metric="m", ts_ms=BASE_MS + i * 9 * DAY_MS)
            for i in range(12)  # over four months
        ]
        assert store.append(events).accepted == 12
        assert store.append(events).duplicates == 12
        found = transport.query(
            "SELECT table, partition_key FROM system.tables WHERE database = currentDatabase()"
            f" AND name IN ('rollup', '{HOUR_SETS}') ORDER BY table"
        )
        assert all(row[1] for row in found), found  # still partitioned, as created
        parts = transport.query(
            "SELECT count(DISTINCT partition) FROM system.parts"
            " WHERE database = currentDatabase() AND table = 'rollup' AND active"
        )
        assert int(parts[0][0]) >= 4
        cells = transport.query(
            f"SELECT sum(cnt) FROM rollup UNION ALL SELECT sum(cnt) FROM {HOUR_SETS}"
        )
        assert [int(row[0]) for row in cells] == [12, 12]
    finally:
        transport.command(f"DROP DATABASE {database}")
        store.close()


def test_a_fresh_database_keeps_its_tables_of_sets_unpartitioned(chstore: ClickHouseStore) -> None:
    """A batch over several months writes one part to each table of sets, not one a month."""
    chstore.create_account(Account("a", "A"))
    events = [
        Event(id=f"e{i}", account_id="a", metric="m", ts_ms=BASE_MS + i * 9 * DAY_MS)
        for i in range(12)
    ]
    chstore.append(events)
    parts = chstore.transport.query(
        "SELECT table, count() FROM system.parts WHERE database = currentDatabase() AND active"
        f" AND table IN ('events', 'rollup', '{HOUR_SETS}') GROUP BY table ORDER BY table"
    )
    assert [(row[0], int(row[1])) for row in parts] == [
        ("events", 4),
        ("rollup", 1),
        (HOUR_SETS, 1),
    ]
