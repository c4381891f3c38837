"""Ingest: turn raw event objects into validated Events, and store a batch whole or not at all.

Every event of a batch is checked before anything is stored, and every problem is reported
with the event's index, so a client fixes a batch in one round trip. Dedupe by (account, id)
happens in the store, inside the batch's transaction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from usagemeter.auth import can_ingest
from usagemeter.model import GROUP_KEY, GROUP_SUBACCOUNT, ApiKey, AppendResult, Event
from usagemeter.store.base import NotFound, Store
from usagemeter.timewindows import parse_instant, to_ms

MAX_BATCH = 10_000
FIELDS = frozenset(
    {"id", "account", "key", "metric", "ts", "value", "billable", "dimensions", "tags"}
)
NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")
DIMENSION = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
RESERVED_DIMENSIONS = frozenset({GROUP_KEY, GROUP_SUBACCOUNT})
MAX_TEXT = 256
# Epoch ms bounds: 1970-01-01 to 2200-01-01. Outside is a unit mistake (seconds, microseconds).
MIN_TS_MS = 0
MAX_TS_MS = 7_258_118_400_000


@dataclass(frozen=True, slots=True)
class EventError:
    index: int
    field: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "message": self.message}


class BatchRejected(ValueError):
    """A batch with at least one bad event; nothing of it was stored."""

    def __init__(self, errors: Sequence[EventError]) -> None:
        self.errors = list(errors)
        first = self.errors[0]
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(f"event {first.index}: {first.message}{more}")


def parse_ts(raw: object) -> int:
    """RFC 3339 text or epoch milliseconds (an integer) -> epoch ms."""
    if isinstance(raw, bool):
        raise ValueError("ts: expected RFC 3339 text or epoch milliseconds, got a boolean")
    if isinstance(raw, int | float):
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError("ts: epoch milliseconds must be a whole number")
        ms = int(raw)
    elif isinstance(raw, str):
        try:
            ms = to_ms(parse_instant(raw))
        except ValueError as exc:
            raise ValueError(f"ts: {exc}") from None
    else:
        raise ValueError("ts: expected RFC 3339 text (2025-01-31T12:00:00Z) or epoch milliseconds")
    if not MIN_TS_MS <= ms < MAX_TS_MS:
        raise ValueError(
            f"ts: {raw!r} is outside 1970-2199; epoch values are milliseconds, not seconds"
        )
    return ms


def _dimensions(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError('dimensions: expected an object of strings, e.g. {"agent": "a1"}')
    out: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not DIMENSION.match(name):
            raise ValueError(f"dimensions: name {name!r} must be 1-64 letters, digits, _ . -")
        if name in RESERVED_DIMENSIONS:
            raise ValueError(f"dimensions: {name!r} is reserved (it is a group-by of its own)")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"dimensions.{name}: expected a string")
        text = str(value)
        if len(text) > MAX_TEXT:
            raise ValueError(f"dimensions.{name}: longer than {MAX_TEXT} characters")
        out[name] = text
    return out


def _tags(raw: object) -> frozenset[str]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        raise ValueError('tags: expected a list of strings, e.g. ["foo", "bar"]')
    for tag in raw:
        if not isinstance(tag, str) or not 0 < len(tag) <= 100 or "," in tag:
            raise ValueError(f"tags: {tag!r} must be a string of 1-100 characters without commas")
    return frozenset(raw)


def parse_event(raw: object, default_account: str | None = None) -> Event:
    """One raw JSON object -> Event, or ValueError naming the field and what to fix."""
    if not isinstance(raw, Mapping):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(FIELDS))}"
        )
    event_id = raw.get("id")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_TEXT:
        raise ValueError("id: required, a unique string per event (1-256 characters)")
    account = raw.get("account", default_account)
    if not isinstance(account, str) or not account:
        raise ValueError("account: required, the id of the account the usage belongs to")
    metric = raw.get("metric")
    if not isinstance(metric, str) or not NAME.match(metric):
        raise ValueError("metric: required, 1-100 letters, digits, _ . : -")
    if "ts" not in raw:
        raise ValueError("ts: required, RFC 3339 text or epoch milliseconds")
    ts_ms = parse_ts(raw["ts"])
    value = raw.get("value", 1)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("value: expected a finite number")
    billable = raw.get("billable", True)
    if not isinstance(billable, bool):
        raise ValueError("billable: expected true or false")
    key = raw.get("key")
    if key is not None and (not isinstance(key, str) or not key):
        raise ValueError("key: expected a key's public id")
    return Event(
        id=event_id,
        account_id=account,
        metric=metric,
        ts_ms=ts_ms,
        value=float(value),
        billable=billable,
        key_id=key,
        dimensions=_dimensions(raw.get("dimensions")),
        tags=_tags(raw.get("tags")),
    )


class Ingestor:
    """Validates batches against the store's accounts and keys and the caller's rights."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # A key never changes account and an account is never deleted, so both caches hold.
        self._key_accounts: dict[str, str | None] = {}
        self._accounts: set[str] = set()

    def _account_exists(self, account_id: str) -> bool:
        if account_id in self._accounts:
            return True
        try:
            self.store.get_account(account_id)
        except NotFound:
            return False
        self._accounts.add(account_id)
        return True

    def _key_account(self, key_id: str) -> str | None:
        if key_id not in self._key_accounts:
            self._key_accounts[key_id] = self.store.get_key(key_id).account_id
        return self._key_accounts[key_id]

    def validate(self, raws: Sequence[object], caller: ApiKey | None = None) -> list[Event]:
        """Every event, or BatchRejected listing every bad one."""
        if len(raws) > MAX_BATCH:
            raise BatchRejected(
                [EventError(MAX_BATCH, None, f"a batch holds at most {MAX_BATCH} events")]
            )
        default_account = caller.account_id if caller is not None else None
        events: list[Event] = []
        errors: list[EventError] = []
        for index, raw in enumerate(raws):
            try:
                event = parse_event(raw, default_account)
                self._check_references(event, caller)
            except ValueError as exc:
                field = str(exc).split(":", 1)[0] if ":" in str(exc) else None
                errors.append(EventError(index, field if field in FIELDS else None, str(exc)))
                continue
            events.append(event)
        if errors:
            raise BatchRejected(errors)
        return events

    def _check_references(self, event: Event, caller: ApiKey | None) -> None:
        if caller is not None and not can_ingest(caller, event.account_id):
            raise ValueError(
                f"account: this key may not send events for account {event.account_id!r}"
            )
        if not self._account_exists(event.account_id):
            raise ValueError(f"account: {event.account_id!r} does not exist; create it first")
        if event.key_id is not None:
            try:
                owner = self._key_account(event.key_id)
            except NotFound:
                raise ValueError(f"key: {event.key_id!r} does not exist") from None
            if owner != event.account_id:
                raise ValueError(f"key: {event.key_id!r} does not belong to {event.account_id!r}")

    def ingest(self, raws: Sequence[object], caller: ApiKey | None = None) -> AppendResult:
        return self.store.append(self.validate(raws, caller))
