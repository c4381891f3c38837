"""Corrections of stored usage: voids and amends (issue 18, Lago #122).

A void takes events out of every report at once and exactly. The stores delete the raw
events and recompute each affected rollup cell from the events that survive, in the void's
transaction: a sum could be subtracted, but a minimum, a maximum, a latest value or a
distinct count cannot. The voided ids stay taken: a retry of a voided event is still a
duplicate. A void is itself recorded (who: the key id; when; why; how many events) and
listed by ``GET /v1/events/voids``.

An amend voids one event and stores its replacement, with the new value, under a new id (the
old id stays taken, so a late retry of the original can never bring it back): the caller's
``new_id``, or ``<id>~<void id>``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from usagemeter.timewindows import from_ms, isoformat

MAX_IDS = 10_000  # ids one void names; a filter selects any number
DAY_MS = 86_400_000


class RawDropped(Exception):
    """The question or correction needs raw events that retention has dropped. Not a
    ValueError: nothing is wrong with the question as such (the API answers 409)."""


@dataclass(frozen=True, slots=True)
class VoidSelector:
    """Which events a void takes: of one account, either by id, or every event of a metric
    in a time range [start, end), optionally of one key and with given dimension values."""

    account_id: str
    ids: tuple[str, ...] = ()
    metric: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    key_id: str | None = None
    dimensions: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        """ValueError listing every problem at once."""
        problems = []
        if not self.account_id:
            problems.append("account: required")
        if self.ids:
            if len(self.ids) > MAX_IDS:
                problems.append(f"ids: at most {MAX_IDS} per void (use a filter for more)")
            if any(not i for i in self.ids):
                problems.append("ids: an id is empty")
            extra = [
                name
                for name, given in (
                    ("metric", self.metric),
                    ("start", self.start_ms),
                    ("end", self.end_ms),
                    ("key", self.key_id),
                    ("dimensions", self.dimensions or None),
                )
                if given is not None
            ]
            if extra:
                problems.append(f"give ids or a filter, not both (also given: {', '.join(extra)})")
        else:
            for name, given in (
                ("metric", self.metric),
                ("start", self.start_ms),
                ("end", self.end_ms),
            ):
                if given is None:
                    problems.append(f"{name}: required when no ids are given")
            if (
                self.start_ms is not None
                and self.end_ms is not None
                and self.start_ms >= self.end_ms
            ):
                problems.append("end: must be after start")
        if problems:
            raise ValueError("; ".join(problems))

    def check_horizon(self, horizon_ms: int | None) -> None:
        """RawDropped if a filter reaches before the retention horizon (ids are checked one
        by one: an id no longer stored is a Conflict, see ``check_found``)."""
        if horizon_ms is not None and not self.ids:
            assert self.start_ms is not None
            if self.start_ms < horizon_ms:
                raise RawDropped(
                    f"raw events before {isoformat(from_ms(horizon_ms))} were dropped by"
                    " retention (their rollups stay): they can no longer be voided or amended"
                    " one by one"
                )

    def check_found(
        self,
        found: set[str],
        gone: Callable[[list[str]], set[str]],
        horizon_ms: int | None,
        conflict: Callable[[str], Exception],
        not_found: Callable[[str], Exception],
    ) -> None:
        """Every id the selector names must be among the events ``found``; of those that are
        not, ``gone`` tells which were stored once (voided before, or dropped by retention:
        a ``conflict``), the others never were (``not_found``)."""
        missing = [i for i in dict.fromkeys(self.ids) if i not in found]
        if not missing:
            return
        taken = gone(missing)
        if taken:
            kept = ""
            if horizon_ms is not None:
                kept = f" (raw events are kept from {isoformat(from_ms(horizon_ms))})"
            raise conflict(
                f"events {sorted(taken)[:10]} are no longer stored: voided before (see GET"
                f" /v1/events/voids) or dropped by retention{kept}; nothing was voided"
            )
        raise not_found(f"no events {missing[:10]} in this account; nothing was voided")

    def as_dict(self) -> dict[str, Any]:
        """What the void record keeps of it (the fields given)."""
        out: dict[str, Any] = {"account": self.account_id}
        if self.ids:
            out["ids"] = list(self.ids)
        for name, value in (
            ("metric", self.metric),
            ("start_ms", self.start_ms),
            ("end_ms", self.end_ms),
            ("key", self.key_id),
        ):
            if value is not None:
                out[name] = value
        if self.dimensions:
            out["dimensions"] = dict(self.dimensions)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VoidSelector:
        return cls(
            account_id=data["account"],
            ids=tuple(data.get("ids", ())),
            metric=data.get("metric"),
            start_ms=data.get("start_ms"),
            end_ms=data.get("end_ms"),
            key_id=data.get("key"),
            dimensions=tuple(sorted(data.get("dimensions", {}).items())),
        )


@dataclass(frozen=True, slots=True)
class Amendment:
    """The replacement an amend stores for the one event it voids."""

    value: float
    new_id: str | None = None  # default: "<id>~<void id>"

    def replacement_id(self, old_id: str, void_id: str) -> str:
        return self.new_id or f"{old_id}~{void_id}"


@dataclass(frozen=True, slots=True)
class VoidRecord:
    id: str
    selector: VoidSelector
    reason: str
    by: str | None  # the key id of the caller; None from the command line
    at_ms: int
    count: int  # events voided
    replacement: str | None = None  # an amend's new event id

    @property
    def account_id(self) -> str:
        return self.selector.account_id


_last_ns = 0


def new_void_id() -> str:
    """A new void's id: the clock's nanoseconds first (never repeating in this process), so
    that ids sort as the voids were made, then random bits, so that processes never clash."""
    global _last_ns
    _last_ns = max(_last_ns + 1, time.time_ns())
    return f"void_{_last_ns:x}{secrets.token_hex(4)}"


def days_touched(rows: Iterable[Sequence[Any]]) -> dict[Any, set[int]]:
    """The UTC days of each metric that rows of (id, metric, ts) fall on: the rollup cells a
    void must recompute."""
    days: dict[Any, set[int]] = {}
    for _, metric, ts in rows:
        days.setdefault(metric, set()).add(int(ts) // DAY_MS)
    return days


def merge_days(days: set[int]) -> list[tuple[int, int]]:
    """Contiguous runs of day numbers as [first, last + 1) ranges: the stores clear and
    recompute a run of days in one statement."""
    runs: list[tuple[int, int]] = []
    for day in sorted(days):
        if runs and runs[-1][1] == day:
            runs[-1] = (runs[-1][0], day + 1)
        else:
            runs.append((day, day + 1))
    return runs
