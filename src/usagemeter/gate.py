"""The middleware's "may I?": refuse a request when the account's limit says ``block`` and
is exceeded, asking the server at most once per account every ``ttl_s`` seconds (the check
is cheap, but a round trip per request of the metered app is not)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import httpx

from usagemeter.client import UsageClient, UsageError

log = logging.getLogger("usagemeter.middleware")


class LimitGate:
    """Which accounts to refuse, by the server's check of ``metric``. It fails open: no
    limit, a key that may not read the account, or a server out of reach refuse nothing."""

    def __init__(self, client: UsageClient, metric: str = "requests", ttl_s: float = 1.0) -> None:
        self.client = client
        self.metric = metric
        self.ttl_s = ttl_s
        self._answers: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    def refusal(self, account: str) -> dict[str, Any] | None:
        """The check's answer to send with a 429, or None to let the request through."""
        now = time.monotonic()
        with self._lock:
            cached = self._answers.get(account)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        try:
            answer: dict[str, Any] | None = self.client.check(self.metric, account)
        except UsageError:
            answer = None  # no limit on the metric (or not this key's to read)
        except httpx.HTTPError as exc:
            log.warning("limit check for %s failed (%s); letting requests through", account, exc)
            answer = None
        blocked = answer is not None and answer.get("exceeded") and answer.get("action") == "block"
        refuse = answer if blocked else None
        with self._lock:
            self._answers[account] = (now, refuse)
        return refuse
