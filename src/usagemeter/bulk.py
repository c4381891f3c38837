"""Many instances of a frozen slotted dataclass made at once, by C loops, and the cyclic
collector paused while a stretch of pure CPU makes many objects that form no cycle.

The engine's windows and an answer's buckets and cells (model.BucketCells) are made so: an
hourly report has about 10,800 cells and 2,160 buckets.
"""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from itertools import repeat
from typing import TypeVar

_T = TypeVar("_T")


def made(kind: type[_T], *columns: Iterable[object]) -> list[_T]:
    """Instances of the frozen slotted dataclass ``kind``, its fields' values taken from
    ``columns`` in field order, made without running its __init__ per instance: a frozen
    dataclass sets each field through object.__setattr__, and an hourly report makes about
    10,800 cells. Each field is set through its slot's descriptor, by C loops (half the
    time). Nothing else is checked by those __init__s, so the instances are the same."""
    names = [f.name for f in fields(kind)]  # type: ignore[arg-type]
    values = [c if isinstance(c, list) else list(c) for c in columns]
    if len(values) != len(names) or len({len(v) for v in values}) != 1:
        raise ValueError(f"{kind.__name__}: one column of equal length per field")
    instances = list(map(object.__new__, repeat(kind, len(values[0]))))
    for name, column in zip(names, values, strict=True):
        deque(map(vars(kind)[name].__set__, instances, column), maxlen=0)
    return instances


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a stretch of pure CPU work that makes many objects
    and no cycle (an answer's cells and buckets): each 700 allocations would otherwise start
    a pass over the young objects, and now and then over every object not frozen. Objects
    are still freed by their counts meanwhile. Left alone when it is off already (another
    thread's stretch, or an application that runs without it); should two threads' stretches
    overlap, the first to end turns it on again, which only means passes resume early."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
