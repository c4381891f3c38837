"""A store that hands back one answer it was given: the engine timed alone, with no database.
Its own module, importing only the store protocol, so that a bench run against another
version's sources (``bench.chasked``) can use it with theirs."""

from __future__ import annotations

from usagemeter.store.base import AggregateColumns, AggregateRow, AggregateSpec


class StoredAnswer:
    """Hands back the answer as the store gave it, a fresh copy of its columns each time (the
    engine may sort or extend them in place)."""

    def __init__(self, answer: AggregateColumns) -> None:
        self.answer = answer

    def raw_horizon(self) -> int | None:
        return None

    def aggregate_columns(self, spec: AggregateSpec) -> AggregateColumns:
        a = self.answer
        return AggregateColumns(list(a.windows), list(a.groups), list(a.values))

    def aggregate(self, spec: AggregateSpec) -> list[AggregateRow]:
        return self.aggregate_columns(spec).rows()
