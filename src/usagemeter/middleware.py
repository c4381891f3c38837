"""Middleware that meters every request of your own FastAPI, Starlette (ASGI) or Flask (WSGI)
app: one event per request, with its status, method and route.

    app.add_middleware(UsageMiddleware, client=usage, account=lambda scope: ...)  # ASGI
    flask_app.wsgi_app = WSGIUsageMiddleware(flask_app.wsgi_app, client=usage,
                                             account=lambda environ: ...)

``account`` maps a request to the account to bill (from its API key, say), or None to leave
the request unmetered. Recording never fails the request: a metering problem is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from usagemeter.client import UsageClient

log = logging.getLogger("usagemeter.middleware")

Scope = Mapping[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]


def _record(
    client: UsageClient, metric: str, account: str, status: int, method: str, path: str
) -> None:
    try:
        client.record(
            metric,
            account=account,
            dimensions={"status": str(status), "method": method, "route": path},
        )
    except Exception:  # metering must never break the metered app
        log.exception("could not record usage for %s %s", method, path)


class UsageMiddleware:
    """Pure ASGI middleware: non-HTTP scopes pass through; state is local to each call."""

    def __init__(
        self,
        app: ASGIApp,
        client: UsageClient,
        account: Callable[[Scope], str | None],
        metric: str = "requests",
    ) -> None:
        self.app = app
        self.client = client
        self.account = account
        self.metric = metric

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before it answers

        async def send_seeing_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_seeing_status)
        finally:
            account = self.account(scope)
            if account is not None:
                route = scope.get("route")
                path = getattr(route, "path", None) or scope.get("path", "")
                _record(self.client, self.metric, account, status, scope["method"], path)


class WSGIUsageMiddleware:
    """The same for WSGI apps (Flask, Django): wrap ``app.wsgi_app``."""

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        client: UsageClient,
        account: Callable[[Mapping[str, Any]], str | None],
        metric: str = "requests",
    ) -> None:
        self.app = app
        self.client = client
        self.account = account
        self.metric = metric

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        status = 500

        def start_seeing_status(code: str, headers: Any, exc_info: Any = None) -> Any:
            nonlocal status
            status = int(code.split(" ", 1)[0])
            return start_response(code, headers, exc_info)

        try:
            return self.app(environ, start_seeing_status)
        finally:
            account = self.account(environ)
            if account is not None:
                method = environ.get("REQUEST_METHOD", "")
                path = environ.get("PATH_INFO", "")
                _record(self.client, self.metric, account, status, method, path)
