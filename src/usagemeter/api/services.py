"""What a request handler reaches through the app: the store, engine, ingestor, clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from starlette.requests import Request

from usagemeter.auth import KeyCache
from usagemeter.engine import Engine
from usagemeter.ingest import Ingestor
from usagemeter.store.base import Store


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Services:
    store: Store
    engine: Engine
    ingestor: Ingestor
    # Endpoints ask this for "now" and "today", so tests can pin the clock of a real server.
    now: Callable[[], datetime] = field(default=utc_now)
    # Keys POST /v1/events authenticated before (the store checks them again at commit).
    keys: KeyCache = field(default_factory=KeyCache)


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found
