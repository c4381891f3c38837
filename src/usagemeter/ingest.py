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
from datetime import datetime
from typing import Annotated, Any

import msgspec

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
# Epoch ms bounds: 2000-01-01 to 2200-01-01. Usage outside them is a unit mistake: epoch
# seconds read as milliseconds land in January 1970, microseconds far past 2200.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 7_258_118_400_000


# The fast path: a whole batch decoded and checked by msgspec in C. Any event it refuses
# sends the batch down the slow path (parse_event), which is lenient where it may be
# (integer dimension values) and names every problem; both accept the same events otherwise.
_Name = Annotated[str, msgspec.Meta(pattern=NAME.pattern)]
_Dimension = Annotated[str, msgspec.Meta(pattern=DIMENSION.pattern)]
_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT)]
_Value = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
_Tag = Annotated[str, msgspec.Meta(pattern=r"^[^,]{1,100}$")]
_EpochMs = Annotated[int, msgspec.Meta(ge=MIN_TS_MS, lt=MAX_TS_MS)]
_Aware = Annotated[datetime, msgspec.Meta(tz=True)]


class _EventIn(msgspec.Struct, forbid_unknown_fields=True):
    id: _Text
    metric: _Name
    ts: _EpochMs | _Aware
    account: _Text | None = None
    key: _Text | None = None
    value: float = 1.0
    billable: bool = True
    dimensions: dict[_Dimension, _Value] = {}
    tags: frozenset[_Tag] = frozenset()


_BATCH = msgspec.json.Decoder(list[_EventIn])
_ONE = msgspec.json.Decoder(_EventIn)
_ANY = msgspec.json.Decoder()


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
            f"ts: {raw!r} is outside 2000-2199; epoch values are milliseconds, not seconds"
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


def _from_fast(item: _EventIn, default_account: str | None) -> Event:
    ts = item.ts if isinstance(item.ts, int) else to_ms(item.ts)
    if not MIN_TS_MS <= ts < MAX_TS_MS or (item.account is None and default_account is None):
        raise ValueError("needs the slow path's message")
    if item.dimensions and not RESERVED_DIMENSIONS.isdisjoint(item.dimensions):
        raise ValueError("needs the slow path's message")
    if not math.isfinite(item.value):  # JSON cannot say inf, but a parsed record can
        raise ValueError("needs the slow path's message")
    return Event(
        id=item.id,
        account_id=item.account or default_account or "",
        metric=item.metric,
        ts_ms=ts,
        value=item.value,
        billable=item.billable,
        key_id=item.key,
        dimensions=item.dimensions,
        tags=item.tags,
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

    def decode(self, body: bytes, ndjson: bool) -> list[object]:
        """The raw items of a JSON array (a lone object is a batch of one) or NDJSON body.
        ValueError says where the text is not JSON."""
        if ndjson:
            items: list[object] = []
            for number, line in enumerate(body.splitlines(), start=1):
                if line.strip():
                    try:
                        items.append(_ANY.decode(line))
                    except msgspec.DecodeError as exc:
                        raise ValueError(f"NDJSON line {number}: {exc}") from None
            return items
        try:
            decoded = _ANY.decode(body)
        except msgspec.DecodeError as exc:
            raise ValueError(f"request body is not valid JSON: {exc}") from None
        if isinstance(decoded, dict):
            return [decoded]
        if not isinstance(decoded, list):
            raise ValueError("expected a JSON array of events")
        return decoded

    def validate_json(self, body: bytes, ndjson: bool, caller: ApiKey | None) -> list[Event]:
        """Events from a request body: msgspec's typed decode when the batch is clean (the
        common case, several times faster), else the item-by-item path that names each
        problem."""
        default_account = caller.account_id if caller is not None else None
        try:
            if ndjson:
                items = [_ONE.decode(line) for line in body.splitlines() if line.strip()]
            else:
                items = _BATCH.decode(body)
            if len(items) <= MAX_BATCH:
                return self._fast(items, default_account, caller)
        except (msgspec.DecodeError, ValueError):
            pass
        return self._validate_each(self.decode(body, ndjson), caller)

    def _fast(
        self, items: Sequence[_EventIn], default_account: str | None, caller: ApiKey | None
    ) -> list[Event]:
        events = [_from_fast(item, default_account) for item in items]
        self._check_batch_references(events, caller)
        return events

    def _check_batch_references(self, events: Sequence[Event], caller: ApiKey | None) -> None:
        """The per-event reference checks, done once per distinct account and key; any
        problem raises so the slow path can name the events."""
        for account_id in {e.account_id for e in events}:
            if caller is not None and not can_ingest(caller, account_id):
                raise ValueError(account_id)
            if not self._account_exists(account_id):
                raise ValueError(account_id)
        for key_id, account_id in {(e.key_id, e.account_id) for e in events if e.key_id}:
            try:
                if self._key_account(key_id) != account_id:
                    raise ValueError(key_id)
            except NotFound:
                raise ValueError(key_id) from None

    def validate(self, raws: Sequence[object], caller: ApiKey | None = None) -> list[Event]:
        """Every event, or BatchRejected listing every bad one. Parsed objects (a file's
        records) take the compiled path too when the batch is clean."""
        if len(raws) <= MAX_BATCH:
            try:
                items = msgspec.convert(raws, list[_EventIn])
                return self._fast(items, caller.account_id if caller else None, caller)
            except (msgspec.ValidationError, ValueError):
                pass
        return self._validate_each(raws, caller)

    def _validate_each(self, raws: Sequence[object], caller: ApiKey | None) -> list[Event]:
        """The item-by-item path: lenient where it may be, and names every problem."""
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
                # Messages start with the field they are about: "ts: ...", "dimensions.agent: ..."
                field = str(exc).split(":", 1)[0].split(".", 1)[0]
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

    def ingest_json(self, body: bytes, ndjson: bool, caller: ApiKey | None) -> AppendResult:
        return self.store.append(self.validate_json(body, ndjson, caller))


def answer(result: AppendResult, events: Sequence[Event]) -> dict[str, Any]:
    """What a stored batch did, as ``POST /v1/events`` answers it: ``duplicates`` counts
    every id seen before, conflicting ones included; ``conflicting`` names the repeats whose
    payload differed from the stored event, which stays as first received."""
    return {
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "conflicts": len(result.conflicts),
        "conflicting": [{"index": i, "id": events[i].id} for i in result.conflicts],
    }
