"""The app factory: one server for the native API, the seed endpoint contracts and the
dashboard, over one store."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from usagemeter import __version__
from usagemeter.alerts import Alerts
from usagemeter.api import (
    compat,
    contracts,
    corrections,
    dashboard,
    limits,
    native,
    portal_tokens,
    prometheus,
    tenants,
)
from usagemeter.api.fastroute import FastRoute
from usagemeter.api.openapi import install_docs
from usagemeter.api.responses import ApiError, JSONResponse, error_response
from usagemeter.api.services import Services, utc_now
from usagemeter.corrections import RawDropped
from usagemeter.engine import Engine
from usagemeter.ingest import MAX_FUTURE, Ingestor
from usagemeter.meters import MeterRegistry
from usagemeter.metrics import RequestMetrics, Telemetry, watch_ingest
from usagemeter.model import Query as UsageQuery
from usagemeter.portal import AppClock, MetricNotAllowed
from usagemeter.serving import freeze_long_lived
from usagemeter.store.base import Store, StoreUnavailable, UnstorableText

log = logging.getLogger("usagemeter")
RETRY_AFTER_S = 30  # what a client is told to wait after a write the store could not take


class CatchAll:
    """Answers any exception a route lets escape with our JSON 500, and swallows it.

    Starlette's own handler for ``Exception`` answers and then re-raises, and uvicorn closes
    the connection of any request whose app raised: every keep-alive client then paid for a
    reconnect. Here the exception stops, so the connection stays usable. The trace goes to
    the server log (redacted by logs.py), never to the client.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # half a response is out: only closing the connection can end it
            response = error_response(
                500, "internal", "internal error; the server log has the details"
            )
            await response(scope, receive, send)


@functools.cache  # once per process
def _freeze_startup() -> None:
    """What startup built (modules, the app, its routes) lives as long as the process:
    frozen, the collector's full passes no longer walk it. Without this an hourly report by
    status (10,000 cells) paid 60 to 110 ms for one full pass over ~85,000 such objects every
    other time it ran; with it, 5 to 20 ms (bench/profile_chquery.py). Once per process: a
    process that builds several apps (the tests) would otherwise keep each one's garbage."""
    freeze_long_lived()


def create_app(
    store: Store,
    meters: MeterRegistry | None = None,
    now: Callable[[], datetime] = utc_now,
    max_future: timedelta = MAX_FUTURE,
    close_store: bool = False,
    metrics: bool = True,
    metrics_accounts: bool = False,
) -> FastAPI:
    """The whole service over ``store``. ``now`` is the clock every endpoint reads;
    ``max_future`` how far ahead of the wall clock an event's timestamp may be.
    ``close_store``: close (and so checkpoint) the store when the server shuts down.
    ``metrics``: count requests and events for ``GET /metrics`` (``metrics_accounts``: with
    account ids as labels)."""
    engine = Engine(store, meters or MeterRegistry())
    telemetry = Telemetry(store, accounts=metrics_accounts) if metrics else None
    ingestor = Ingestor(store, meters=engine.meters, max_future=max_future)
    if telemetry is not None:
        watch_ingest(ingestor, telemetry)
    alerts = Alerts(store, engine, now)  # limits' crossings and their webhooks
    ingestor.after_append.append(alerts.after_append)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Read routes run on the event loop's thread; open its SQLite connection and run one
        # query through the whole engine now, so the first customer's request is not the
        # one that pays for it.
        now = utc_now()
        engine.run(UsageQuery(accounts=(), metric="", start=now - timedelta(days=1), end=now))
        store.list_accounts()
        _freeze_startup()
        alerts.start()
        yield
        alerts.stop()
        if close_store:
            # Here, not after the server returns: uvicorn re-raises SIGTERM once it has shut
            # down, and the process ends then, before any code after it runs.
            store.close()

    app = FastAPI(
        title="usagemeter",
        version=__version__,
        description="Self-hosted usage metering and usage analytics for API providers.",
        default_response_class=JSONResponse,
        lifespan=lifespan,
        docs_url=None,  # served by install_docs, without a CDN
        redoc_url=None,
        # FastAPI's own OpenTelemetry asked for the global providers on every request (15 µs,
        # a twentieth of a one-event request's CPU); usagemeter sets none up, and exports
        # its metrics for Prometheus itself (metrics.py).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_docs(app)
    app.state.telemetry = telemetry
    app.state.services = Services(store=store, engine=engine, ingestor=ingestor, now=now)
    app.state.alerts = alerts

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> Response:
        # 507 Insufficient Storage: the request was fine and may be sent again as it is.
        response = error_response(507, "store_unavailable", str(exc))
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.exception_handler(UnstorableText)
    async def unstorable_text(request: Request, exc: UnstorableText) -> Response:
        return error_response(400, "invalid_text", str(exc))

    @app.exception_handler(RawDropped)
    async def raw_dropped(request: Request, exc: RawDropped) -> Response:
        # The question is fine but needs raw events that retention dropped: say which part.
        return error_response(409, "raw_events_dropped", str(exc))

    @app.exception_handler(MetricNotAllowed)
    async def metric_not_allowed(request: Request, exc: MetricNotAllowed) -> Response:
        return error_response(403, "forbidden", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"param": ".".join(str(p) for p in e.get("loc", ())[1:]), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        message = "; ".join(f"{e['param']}: {e['message']}" for e in errors)
        return error_response(400, "invalid_request", message, {"errors": errors})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint at {request.url.path}; see /docs"
        return error_response(exc.status_code, code, message)

    # Innermost, so that every middleware below sees its requests as any other's.
    app.add_middleware(
        FastRoute,
        method="POST",
        path="/v1/events",
        endpoint=native.post_events,
        route=native.events_route(),
        handlers=app.exception_handlers,
    )
    app.add_middleware(CatchAll)
    app.add_middleware(AppClock, now=now)  # portal tokens expire by this app's clock
    if telemetry is not None:
        # Outside CatchAll, so that a request it answers with a 500 is counted as one.
        app.add_middleware(RequestMetrics, telemetry=telemetry)
    app.include_router(native.router)
    app.include_router(tenants.router)
    app.include_router(corrections.router)
    app.include_router(limits.router)
    app.include_router(portal_tokens.router)
    app.include_router(dashboard.router)
    app.include_router(prometheus.router)
    for router in contracts.routers():
        app.include_router(router)
    for router in compat.routers():  # /openmeter, /lago, /stripe
        app.include_router(router)
    return app
