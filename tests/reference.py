"""The reference a store's folded answers are checked against in property tests: the events
folded one by one in the order they were stored."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from usagemeter.model import Event
from usagemeter.store.base import TOTAL, Window


def fold_cells(
    events: Iterable[Event], windows: Sequence[Window], keep: Callable[[Event], bool]
) -> dict[int, tuple]:
    """Each window's (and the total's) count, sum, minimum, maximum and latest value of the
    events ``keep`` accepts: the latest value is that of the greatest timestamp, and on a tie
    the later event's (as a later report of a gauge should win)."""
    cells: dict[int, list] = {}
    for event in events:
        if not keep(event):
            continue
        for w in windows:
            if w.start_ms <= event.ts_ms < w.end_ms:
                for index in (w.index, TOTAL):
                    v = event.value
                    cell = cells.setdefault(index, [0, 0.0, v, v, event.ts_ms, v])
                    cell[0] += 1
                    cell[1] += v
                    cell[2], cell[3] = min(cell[2], v), max(cell[3], v)
                    if event.ts_ms >= cell[4]:
                        cell[4], cell[5] = event.ts_ms, v
    return {i: (c[0], c[1], c[2], c[3], c[5]) for i, c in cells.items()}
