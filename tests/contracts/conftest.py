"""The seed contracts run on every store of conftest.STORES, and a representative part of
them (the usage API, and the detailed usage over zones and DST) on a ClickHouse database
that folds its rollups after the acknowledgement (conftest.CHDB_LATER): all of them there
took as long again as on "chdb" (2.5 minutes), for the same SQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CHDB_LATER, STORES, open_test_store
from usagemeter.store.base import Store

FOLD_LATER_MODULES = ("test_usage_v1.py", "test_detail_usage_time.py")


@pytest.fixture(params=[*STORES, CHDB_LATER])
def store(request: pytest.FixtureRequest, db_path: Path) -> Iterator[Store]:
    """A fresh, empty store of each kind, the fold-later database among them."""
    s = open_test_store(request.param, request, db_path)
    yield s
    s.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fold-later database's contracts outside FOLD_LATER_MODULES are not run."""
    kept, dropped = [], []
    for item in items:
        later = f"[{CHDB_LATER}" in item.nodeid or f"-{CHDB_LATER}" in item.nodeid
        inside = item.nodeid.split("::")[0].endswith(FOLD_LATER_MODULES)
        (dropped if later and not inside else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
