"""Ingest: turn raw event objects into validated Events, and store a batch whole or not at all.

Every event of a batch is checked before anything is stored, and every problem is reported
with the event's index, so a client fixes a batch in one round trip. Dedupe by (account, id)
happens in the store, inside the batch's transaction.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec

from usagemeter.auth import can_ingest
from usagemeter.meters import MeterRegistry
from usagemeter.model import GROUP_KEY, GROUP_SUBACCOUNT, ApiKey, AppendResult, Event
from usagemeter.store.base import NotFound, Store, StoreUnavailable
from usagemeter.timewindows import isoformat, parse_instant, to_ms

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
# Late events are a feature (a backfill, a client that was offline); an event from more than a
# day ahead is a clock or unit mistake that would sit in tomorrow's buckets unnoticed.
MAX_FUTURE = timedelta(hours=24)
# |value| at most a quadrillion. Rollups keep sums as doubles: at this bound even 2**63
# events in one slot sum to about 1e34, far from overflowing to infinity (two 1.7e308s did,
# and inf - inf is NaN, which SQLite stores as NULL, so the slot rejected every later event).
MAX_VALUE = 1e15
MAX_DEPTH = 8  # JSON nesting: an event is at depth 2, its dimensions at 3
# U+0000 in any text of an event is refused by every store, not only by the one that cannot
# keep it (PostgreSQL): an event one store takes must move to any other (usagemeter migrate).
NUL = "\x00"
NUL_ESCAPED = b"\\u0000"  # how JSON carries it (raw control characters are not JSON)


# The fast path: a whole batch decoded and checked by msgspec in C. Any event it refuses
# sends the batch down the slow path (parse_event), which is lenient where it may be
# (integer dimension values) and names every problem; both accept the same events otherwise.
# Names (metric, dimension names, tags) are checked once per distinct name in the batch
# (_check_names), not by a pattern per event in the decoder: a batch repeats a few names
# thousands of times, and the patterns were half of the decode's time.
_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT)]
_Value = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
_EpochMs = Annotated[int, msgspec.Meta(ge=MIN_TS_MS, lt=MAX_TS_MS)]
_Aware = Annotated[datetime, msgspec.Meta(tz=True)]
_Amount = Annotated[float, msgspec.Meta(ge=-MAX_VALUE, le=MAX_VALUE)]


# gc=False: a decoded event holds only strings, numbers, a dict and a frozenset of strings, so
# it cannot be part of a reference cycle; untracked, a batch's thousand structs do not trigger
# the collector's passes over the young objects.
class _EventIn(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    id: _Text
    metric: str
    ts: _EpochMs | _Aware
    account: _Text | None = None
    key: _Text | None = None
    value: _Amount = 1.0
    billable: bool = True
    dimensions: dict[str, _Value] = {}
    tags: frozenset[str] = frozenset()


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


_EPOCH_TEXT = re.compile(r"-?[0-9]{1,16}")
_HAS_OFFSET = re.compile(r"[0-9][Tt ][0-9:.,]+(?:[Zz]|[+-][0-9]{2}:?[0-9]{2})$")


def check_depth(value: object, limit: int = MAX_DEPTH) -> None:
    """ValueError if decoded JSON nests arrays or objects deeper than ``limit``. Error
    messages quote values, and the repr of a deep one exhausts the recursion limit; so does
    decoding a deeper one, which ``decode_any`` reports in the same words."""
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = []
    if isinstance(value, dict | list):
        stack.append((value, 1))
    while stack:  # a loop, not recursion: the point is not to recurse
        item, depth = stack.pop()
        if depth > limit:
            raise ValueError(_TOO_DEEP)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def decode_any(text: bytes) -> object:
    """Any JSON text, no deeper than MAX_DEPTH; msgspec.DecodeError if it is not JSON."""
    try:
        value = _ANY.decode(text)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    check_depth(value)
    return value


_TOO_DEEP = f"JSON nested deeper than {MAX_DEPTH} levels; events are flat"


def parse_ts(raw: object) -> int:
    """RFC 3339 text or epoch milliseconds (an integer) -> epoch ms."""
    if isinstance(raw, bool):
        raise ValueError("ts: expected RFC 3339 text or epoch milliseconds, got a boolean")
    if isinstance(raw, int | float):
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError("ts: epoch milliseconds must be a whole number")
        ms = int(raw)
    elif isinstance(raw, str):
        if not _EPOCH_TEXT.fullmatch(raw.strip()) and not _HAS_OFFSET.search(raw.strip()):
            # RFC 3339 requires the offset: without one "12:00" could be any zone's noon.
            raise ValueError(
                f"ts: {raw[:40]!r} has no UTC offset; send RFC 3339 with Z or +hh:mm"
                " (2025-01-31T12:00:00Z) or epoch milliseconds"
            )
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
        _refuse_nul(f"dimensions.{name}", text)
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
        _refuse_nul("tags", tag)
    return frozenset(raw)


def _refuse_nul(field: str, text: str) -> None:
    if NUL in text:
        raise ValueError(f"{field}: contains a NUL character (\\u0000); remove it")


def _nul_in(items: Sequence[_EventIn]) -> bool:
    """Whether any text of the decoded ``items`` holds U+0000 (the slow path then names it);
    for parsed records, which have no JSON body to look at."""
    return any(
        NUL in item.id
        or NUL in (item.account or "")
        or NUL in (item.key or "")
        or any(NUL in value for value in item.dimensions.values())
        or any(NUL in tag for tag in item.tags)
        for item in items
    )


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
    _refuse_nul("id", event_id)
    account = raw.get("account", default_account)
    if not isinstance(account, str) or not account:
        raise ValueError("account: required, the id of the account the usage belongs to")
    _refuse_nul("account", account)
    metric = raw.get("metric")
    if not isinstance(metric, str) or not NAME.match(metric):
        raise ValueError("metric: required, 1-100 letters, digits, _ . : -")
    if "ts" not in raw:
        raise ValueError("ts: required, RFC 3339 text or epoch milliseconds")
    ts_ms = parse_ts(raw["ts"])
    value = raw.get("value", 1)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("value: expected a finite number")
    if not -MAX_VALUE <= value <= MAX_VALUE:
        raise ValueError(f"value: {value:g} is beyond the bound of ±{MAX_VALUE:g} per event")
    billable = raw.get("billable", True)
    if not isinstance(billable, bool):
        raise ValueError("billable: expected true or false")
    key = raw.get("key")
    if key is not None and (not isinstance(key, str) or not key):
        raise ValueError("key: expected a key's public id")
    if key is not None:
        _refuse_nul("key", key)
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


def _check_names(items: Sequence[_EventIn]) -> None:
    """ValueError if a metric, dimension name or tag of ``items`` is one the slow path refuses
    (which then names it); each distinct name is checked once."""
    if not all(NAME.match(metric) for metric in {item.metric for item in items}):
        raise ValueError("needs the slow path's message")
    names = {name for item in items if item.dimensions for name in item.dimensions}
    if not RESERVED_DIMENSIONS.isdisjoint(names) or not all(DIMENSION.match(n) for n in names):
        raise ValueError("needs the slow path's message")
    tags = {tag for item in items if item.tags for tag in item.tags}
    if not all(0 < len(tag) <= 100 and "," not in tag for tag in tags):
        raise ValueError("needs the slow path's message")


def _from_fast(item: _EventIn, default_account: str | None) -> Event:
    ts = item.ts if isinstance(item.ts, int) else to_ms(item.ts)
    if not MIN_TS_MS <= ts < MAX_TS_MS or (item.account is None and default_account is None):
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


def _wall_clock() -> datetime:
    return datetime.now(UTC)


class Ingestor:
    """Validates batches against the store's accounts and keys and the caller's rights.

    ``max_future``: how far ahead of the server's clock an event's ``ts`` may be (``now``
    reads that clock). ``meters`` says which metrics take negative values."""

    def __init__(
        self,
        store: Store,
        *,
        meters: MeterRegistry | None = None,
        max_future: timedelta = MAX_FUTURE,
        now: Callable[[], datetime] = _wall_clock,
    ) -> None:
        if max_future < timedelta(0):
            raise ValueError("max_future: must not be negative")
        self.store = store
        self.meters = meters or MeterRegistry()
        self.max_future = max_future
        self.now = now
        # A key never changes account and an account is never deleted, so both caches hold.
        self._key_accounts: dict[str, str | None] = {}
        self._accounts: set[str] = set()
        # Why the last write failed, while writes fail; None once one succeeds again.
        self.write_failure: str | None = None
        # Called with each stored batch after its commit (limits.py's alerts watch them).
        # Told of every stored batch (its events, what became of them, the seconds the store
        # took) and of every refused one, whichever path it came in by: limits' alerts and
        # the Prometheus counters listen here.
        self.after_append: list[Callable[[Sequence[Event], AppendResult, float], None]] = []
        self.on_refused: list[Callable[[Exception], None]] = []

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

    def _gone_references(self, events: Sequence[Event], found: NotFound) -> list[EventError]:
        """The store found no account or key an event names: forget what this process
        knew of accounts and keys, and check each event afresh."""
        self._accounts, self._key_accounts = set(), {}
        errors = []
        for index, event in enumerate(events):
            try:
                self._check_references(event, None)
            except ValueError as exc:
                field = str(exc).split(":", 1)[0]
                errors.append(EventError(index, field if field in FIELDS else None, str(exc)))
        # Should it exist again already (deleted and created anew), the store's answer stands.
        return errors or [EventError(0, None, f"{found}; send the batch again")]

    def decode(self, body: bytes, ndjson: bool) -> list[object]:
        """The raw items of a JSON array (a lone object is a batch of one) or NDJSON body.
        ValueError says where the text is not JSON."""
        if ndjson:
            items: list[object] = []
            for number, line in enumerate(body.splitlines(), start=1):
                if line.strip():
                    try:
                        items.append(decode_any(line))
                    except (msgspec.DecodeError, ValueError) as exc:
                        raise ValueError(f"NDJSON line {number}: {exc}") from None
            return items
        try:
            decoded = decode_any(body)
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
        events = self.validate_clean(body, ndjson, caller)
        if events is not None:
            return events
        try:
            return self._validate_each(self.decode(body, ndjson), caller)
        except (BatchRejected, ValueError) as exc:
            self._refused(exc)
            raise

    def validate_clean(
        self, body: bytes, ndjson: bool, caller: ApiKey | None
    ) -> list[Event] | None:
        """The events of a body the compiled path takes whole, or None: a body it refuses
        (an item that is no clean event, a record of another type) is the caller's to take
        item by item, which names each problem."""
        if NUL_ESCAPED in body:  # rare: the slow path names the text that holds it
            return None
        default_account = caller.account_id if caller is not None else None
        try:
            if ndjson:
                items = [_ONE.decode(line) for line in body.splitlines() if line.strip()]
            else:
                items = _BATCH.decode(body)
            if len(items) <= MAX_BATCH:
                return self._fast(items, default_account, caller)
        except (msgspec.DecodeError, ValueError, RecursionError):
            pass
        return None

    def _fast(
        self, items: Sequence[_EventIn], default_account: str | None, caller: ApiKey | None
    ) -> list[Event]:
        _check_names(items)
        events = [_from_fast(item, default_account) for item in items]
        latest_ms = self._latest_ms()
        for e in events:  # any problem: the slow path names it
            self._check_time_and_value(e, latest_ms)
        self._check_batch_references(events, caller)
        return events

    def _latest_ms(self) -> int:
        return to_ms(self.now() + self.max_future)

    def _check_time_and_value(self, event: Event, latest_ms: int) -> None:
        if event.ts_ms > latest_ms:
            minutes = self.max_future / timedelta(minutes=1)
            limit = f"{minutes / 60:g} hours" if minutes % 60 == 0 else f"{minutes:g} minutes"
            raise ValueError(
                f"ts: {isoformat(datetime.fromtimestamp(event.ts_ms / 1000, UTC))} is more"
                f" than {limit} ahead of the server's clock"
                f" ({isoformat(self.now())}); send events when they happen"
            )
        if event.value < 0 and not self.meters.get(event.metric).negative_allowed:
            raise ValueError(
                f"value: {event.value:g} is negative, and the meter of {event.metric!r} does not"
                ' allow negative values (set "allow_negative": true on it in the meters file)'
            )

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
                if _nul_in(items):
                    raise ValueError("needs the slow path's message")
                return self._fast(items, caller.account_id if caller else None, caller)
            except (msgspec.ValidationError, ValueError):
                pass
        try:
            return self._validate_each(raws, caller)
        except (BatchRejected, ValueError) as exc:
            self._refused(exc)
            raise

    def _refused(self, exc: Exception) -> None:
        for hook in self.on_refused:
            hook(exc)

    def _validate_each(self, raws: Sequence[object], caller: ApiKey | None) -> list[Event]:
        """The item-by-item path: lenient where it may be, and names every problem."""
        if len(raws) > MAX_BATCH:
            raise BatchRejected(
                [EventError(MAX_BATCH, None, f"a batch holds at most {MAX_BATCH} events")]
            )
        default_account = caller.account_id if caller is not None else None
        latest_ms = self._latest_ms()
        events: list[Event] = []
        errors: list[EventError] = []
        for index, raw in enumerate(raws):
            try:
                event = parse_event(raw, default_account)
                self._check_time_and_value(event, latest_ms)
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
                owner = None
            if owner != event.account_id:
                # One message for a missing key and another account's: a key id must not be
                # a way to learn that some other tenant's key exists.
                raise ValueError(
                    f"key: {event.key_id!r} is not a key of account {event.account_id!r}"
                )

    def ingest(self, raws: Sequence[object], caller: ApiKey | None = None) -> AppendResult:
        return self._append(self.validate(raws, caller))

    def ingest_json(self, body: bytes, ndjson: bool, caller: ApiKey | None) -> AppendResult:
        return self._append(self.validate_json(body, ndjson, caller))

    def append(self, events: Sequence[Event]) -> AppendResult:
        """Store events ``validate`` returned (the after-append hooks run as for ``ingest``)."""
        return self._append(events)

    def _append(self, events: Sequence[Event]) -> AppendResult:
        with self.writing(events) as write:
            write.result = self.store.append(events)
        assert write.result is not None  # writing() raised otherwise
        return write.result

    @contextmanager
    def writing(self, events: Sequence[Event]) -> Iterator[Write]:
        """Around a store write of ``events``, whichever way it is made (the body sets the
        write's ``result``): remember whether the store is failing writes (for /healthz),
        and once the events are stored, call the ``after_append`` hooks."""
        write = Write()
        started = time.perf_counter()
        try:
            yield write
        except StoreUnavailable as exc:
            self.write_failure = str(exc)
            raise
        except NotFound as exc:
            # An account or key deleted since this process last looked (perhaps by another
            # process): the batch is refused as if checked now, naming each event it names.
            raise BatchRejected(self._gone_references(events, exc)) from None
        self.write_failure = None
        if write.result is None:
            raise RuntimeError("a write ended without its result")
        seconds = time.perf_counter() - started
        for hook in self.after_append:
            hook(events, write.result, seconds)


@dataclass
class Write:
    """One store write under ``Ingestor.writing``: its result, once the store answered."""

    result: AppendResult | None = None


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
