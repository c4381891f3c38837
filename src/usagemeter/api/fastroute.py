"""A short road for the busiest request: ``POST /v1/events`` past the framework's router.

A one-event request cost about 500 µs of CPU, and a third of it was the framework around the
route, not the route: matching the path against every route of the app (the seed contracts,
the peers' APIs), FastAPI's dependency solving and its exception and body-limit wrappers.
``FastRoute`` is pure ASGI middleware that answers exactly this method and path itself,
calling the very endpoint function the router would, and turning what it raises into a
response with the very handler the app registered for it; anything else goes on to the
router. Every middleware outside it (metrics, the app's clock, the catch-all 500) still sees
the request, and the route stays in the OpenAPI document as it was.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Any]


class FastRoute:
    """Answers ``method path`` with ``endpoint`` directly; passes everything else on.
    ``route`` is the app's own route for it (written into the scope, as the router does, so
    the request metrics label it by its template); ``handlers`` the app's exception
    handlers, looked up by the exception's class as Starlette does."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        method: str,
        path: str,
        endpoint: Endpoint,
        route: BaseRoute,
        handlers: Mapping[Any, Handler],
    ) -> None:
        self.app = app
        self.method = method
        self.path = path
        self.endpoint = endpoint
        self.route = route
        # Status-code keys (ints) and Exception itself belong to other layers: an exception
        # without a handler of its own propagates, to the catch-all's 500, as from a route.
        self.handlers = {
            k: v for k, v in handlers.items() if isinstance(k, type) and k is not Exception
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != self.path
            or scope["method"] != self.method
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        request = Request(scope, receive, send)
        try:
            response = await self.endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            found = self.handlers.get(cls)
            if found is not None:
                return found
        return None
