"""Questions asked alike of two stores in property tests: a generated question (a dict of
its parts) made into a ``Query`` and run, its answer as the part both stores must equal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from usagemeter.engine import Engine
from usagemeter.model import Query


def answers_to(
    engine: Engine, accounts: Sequence[str], base: datetime, asked: Sequence[dict[str, Any]]
) -> list[tuple[Any, ...]]:
    """Each question's buckets, totals and total: ``start`` and ``length`` in milliseconds
    from ``base``; filters and billable optional."""
    found = []
    for q in asked:
        start = base + timedelta(milliseconds=q["start"])
        query = Query(
            accounts=tuple(accounts),
            metric="m",
            start=start,
            end=start + timedelta(milliseconds=q["length"]),
            granularity=q["granularity"],
            tz=q["tz"],
            aggregations=(q["aggregation"],),
            group_by=q["group_by"],
            filters=q.get("filters", ()),
            tags=q["tags"],
            billable=q.get("billable"),
        )
        result = engine.run(query)
        found.append((result.buckets, result.totals, result.total))
    return found
