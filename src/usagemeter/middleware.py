"""Middleware that meters every request of your own FastAPI, Starlette (ASGI) or Flask (WSGI)
app: one event per request, with its status, method and route.

    app.add_middleware(UsageMiddleware, client=usage, account=account_of_request)  # ASGI
    flask_app.wsgi_app = WSGIUsageMiddleware(flask_app.wsgi_app, client=usage,
                                             account=account_of_environ)

``account`` maps a request to the account to bill (from its API key, say), or None to leave
the request unmetered. The ASGI middleware calls it with a Starlette ``Request`` (headers,
query parameters, path; the body has gone to the app and is not readable there); the WSGI one
with the request's WSGI environ, a dict whose headers are ``HTTP_*`` keys
(``environ.get("HTTP_X_API_KEY")``). It runs after the response, once per request. An
``account`` that cannot be called with one argument is refused when the middleware is built;
an exception it raises is logged and leaves that request unmetered. Recording never fails the
request: a metering problem is logged.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from usagemeter.client import UsageClient
from usagemeter.gate import LimitGate

log = logging.getLogger("usagemeter.middleware")

Scope = MutableMapping[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]


def _checked(account: Any, argument: str) -> Any:
    """``account`` if it can be called with one argument; else a TypeError now, at startup,
    rather than an error logged on every request with nothing metered."""
    if not callable(account):
        raise TypeError(f"account must be a callable taking the {argument}, got {account!r}")
    try:
        inspect.signature(account).bind(None)
    except TypeError:
        raise TypeError(
            f"account must take exactly one argument, the {argument}: {account!r} cannot"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): trust it
        pass
    return account


def _account_of(account: Callable[[Any], str | None], request: Any, where: str) -> str | None:
    try:
        return account(request)
    except Exception:  # metering must never break the metered app
        log.exception("the account callable failed on %s; the request is not metered", where)
        return None


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
        account: Callable[[Request], str | None],
        metric: str = "requests",
        block: LimitGate | None = None,
    ) -> None:
        """``block``: answer 429, with the limit check's body, to the requests of an
        account whose ``block`` limit is exceeded (``account`` then runs before the app too,
        without the matched route)."""
        self.app = app
        self.client = client
        self.account = _checked(account, "Starlette Request")
        self.metric = metric
        self.block = block

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.block is not None:
            account = _account_of(self.account, Request(scope), scope.get("path", ""))
            refusal = (
                None if account is None else await run_in_threadpool(self.block.refusal, account)
            )
            if refusal is not None:
                await JSONResponse(refusal, status_code=429)(scope, receive, send)
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
            # The router has added the matched route to the scope by now.
            account = _account_of(self.account, Request(scope), scope.get("path", ""))
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
        account: Callable[[dict[str, Any]], str | None],
        metric: str = "requests",
        block: LimitGate | None = None,
    ) -> None:
        """``block``: as for UsageMiddleware, a 429 with the limit check's body."""
        self.app = app
        self.client = client
        self.account = _checked(account, "WSGI environ")
        self.metric = metric
        self.block = block

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if self.block is not None:
            account = _account_of(self.account, environ, environ.get("PATH_INFO", ""))
            refusal = None if account is None else self.block.refusal(account)
            if refusal is not None:
                body = json.dumps(refusal).encode()
                headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
                start_response("429 Too Many Requests", headers)
                return [body]
        status = 500

        def start_seeing_status(code: str, headers: Any, exc_info: Any = None) -> Any:
            nonlocal status
            status = int(code.split(" ", 1)[0])
            return start_response(code, headers, exc_info)

        try:
            return self.app(environ, start_seeing_status)
        finally:
            account = _account_of(self.account, environ, environ.get("PATH_INFO", ""))
            if account is not None:
                method = environ.get("REQUEST_METHOD", "")
                path = environ.get("PATH_INFO", "")
                _record(self.client, self.metric, account, status, method, path)
