"""Realistic demo data: a few customers, a subaccount tree, keys with known secrets, and
100 days of usage of every default metric, so a newcomer sees real numbers at once.

Event ids are derived from the account, metric and day, so loading the demo again on the same
file adds only the days that are new, never a second copy.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from usagemeter.auth import issue_key
from usagemeter.model import Account, Event, Scope
from usagemeter.store.base import NotFound, Store
from usagemeter.timewindows import BillingCycle, to_ms

DAYS = 100


@dataclass(frozen=True)
class DemoKey:
    id: str
    account_id: str | None
    secret: str
    prefix: str
    scopes: tuple[Scope, ...]


# Well-known secrets: fine for a demo file on a laptop, never for real data.
OPERATOR = DemoKey("key_demo_operator", None, "demo_operator_secret", "", (Scope.OPERATOR,))
KEYS = (
    OPERATOR,
    DemoKey("key_acme_prod", "acme", "ak_demo_acme_prod", "ak_", (Scope.READ, Scope.INGEST)),
    DemoKey("key_acme_test", "acme", "ak_demo_acme_test", "ak_", (Scope.READ,)),
    DemoKey("key_acme_eu", "acme-eu", "ak_demo_acme_eu", "ak_", (Scope.READ,)),
    DemoKey("key_globex", "globex", "aik_v1_demo_globex", "aik_v1_", (Scope.READ,)),
    DemoKey("key_initech", "initech", "um_demo_initech", "um_", (Scope.READ,)),
)
ACCOUNTS = (
    Account("acme", "Acme Corp", None, BillingCycle(date(2024, 1, 31), "month")),
    Account("acme-eu", "Acme Europe", "acme"),
    Account("acme-eu-support", "Acme Europe Support", "acme-eu"),
    Account("acme-us", "Acme US", "acme"),
    Account("globex", "Globex", None, BillingCycle(date(2023, 6, 15), "year")),
    Account("initech", "Initech"),
)
# Relative volume per account: one heavy customer, the rest smaller.
WEIGHT = {"acme": 6, "acme-eu": 3, "acme-eu-support": 1, "acme-us": 2, "globex": 4, "initech": 1}
AGENTS = ("sales-bot", "support-bot", "onboarding")
TAGS = ("prod", "web", "mobile", "batch")
STATUSES = ("200",) * 17 + ("201", "404", "429", "500")


def _day_events(account: str, day: date, keys: list[str]) -> Iterator[Event]:
    rng = random.Random(f"{account}/{day.isoformat()}")
    weight = WEIGHT.get(account, 1)
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    # Weekdays are busier than weekends, as API traffic is.
    busy = 1.0 if day.weekday() < 5 else 0.4

    def at() -> int:
        # Office-hours shaped: most usage between 08:00 and 20:00 UTC.
        hour = min(23, max(0, int(rng.gauss(14, 4))))
        return to_ms(start + timedelta(hours=hour, seconds=rng.randrange(3600)))

    def n(base: float) -> int:
        return max(0, int(rng.gauss(base * weight * busy, base * weight * busy / 4)))

    def event(
        metric: str,
        i: int,
        value: float = 1.0,
        billable: bool = True,
        dimensions: dict[str, str] | None = None,
        tags: frozenset[str] = frozenset(),
        ts_ms: int | None = None,
    ) -> Event:
        return Event(
            id=f"demo-{metric}-{day.isoformat()}-{i}",
            account_id=account,
            metric=metric,
            ts_ms=at() if ts_ms is None else ts_ms,
            value=value,
            billable=billable,
            key_id=rng.choice(keys) if keys else None,
            dimensions=dimensions or {},
            tags=tags,
        )

    for i in range(n(8)):
        yield event("actions", i, dimensions={"source": rng.choice(("app", "app", "api"))})
    for i in range(n(12)):
        tags = frozenset(rng.sample(TAGS, rng.randrange(0, 3)))
        dims = {"licensee": f"sl_{rng.randrange(1, 4)}"}
        yield event("lookups", i, billable=rng.random() < 0.9, tags=tags, dimensions=dims)
    for i in range(n(20)):
        yield event("requests", i, dimensions={"status": rng.choice(STATUSES)})
    for i in range(n(4)):
        dims = {"agent": rng.choice(AGENTS), "type": rng.choice(("inbound", "outbound"))}
        yield event("conversations", i, value=float(rng.randrange(20, 900)), dimensions=dims)
    for metric, base in (("ApiCalls", 10), ("Events", 6), ("BotAnalyses", 2)):
        for i in range(n(base)):
            yield event(metric, i, value=float(rng.randrange(1, 5)))
    for i in range(n(5)):
        yield event("Sessions", i, dimensions={"session_id": f"s{rng.randrange(0, 40 * weight)}"})
    storage = 1_000_000 * weight + (day.toordinal() % 30) * 50_000 * weight
    yield event("StorageBytes", 0, value=float(storage), ts_ms=to_ms(start + timedelta(hours=23)))


def load_demo(store: Store, now: datetime | None = None) -> int:
    """Create the demo accounts and keys (once) and ``DAYS`` days of usage up to now.
    Returns the number of events newly stored."""
    for account in ACCOUNTS:
        try:
            store.get_account(account.id)
        except NotFound:
            store.create_account(account)
    for key in KEYS:
        try:
            store.get_key(key.id)
        except NotFound:
            issue_key(
                store,
                key.account_id,
                name=f"demo {key.id}",
                prefix=key.prefix,
                scopes=key.scopes,
                key_id=key.id,
                secret=key.secret,
            )
    now = now or datetime.now(UTC)
    now_ms, today = to_ms(now), now.astimezone(UTC).date()
    keys_of = {a.id: [k.id for k in KEYS if k.account_id == a.id] for a in ACCOUNTS}
    stored = 0
    for offset in range(DAYS, -1, -1):
        day = today - timedelta(days=offset)
        batch = [
            e
            for a in ACCOUNTS
            for e in _day_events(a.id, day, keys_of[a.id])
            if e.ts_ms <= now_ms  # usage has happened; none in the future
        ]
        stored += store.append(batch).accepted
    return stored
