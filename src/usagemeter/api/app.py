"""The app factory: one server for the native API, the seed endpoint contracts and the
dashboard, over one store."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from usagemeter import __version__
from usagemeter.api import compat, contracts, dashboard, native, tenants
from usagemeter.api.responses import ApiError, JSONResponse, error_response
from usagemeter.api.services import Services, utc_now
from usagemeter.engine import Engine
from usagemeter.ingest import Ingestor
from usagemeter.meters import MeterRegistry
from usagemeter.model import Query as UsageQuery
from usagemeter.store.base import Store

log = logging.getLogger("usagemeter")


def create_app(
    store: Store,
    meters: MeterRegistry | None = None,
    now: Callable[[], datetime] = utc_now,
) -> FastAPI:
    """The whole service over ``store``. ``now`` is the clock every endpoint reads."""
    engine = Engine(store, meters or MeterRegistry())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Read routes run on the event loop's thread; open its SQLite connection and run one
        # query through the whole engine now, so the first customer's request is not the
        # one that pays for it.
        now = utc_now()
        engine.run(UsageQuery(accounts=(), metric="", start=now - timedelta(days=1), end=now))
        store.list_accounts()
        yield

    app = FastAPI(
        title="usagemeter",
        version=__version__,
        description="Self-hosted usage metering and usage analytics for API providers.",
        default_response_class=JSONResponse,
        lifespan=lifespan,
    )
    app.state.services = Services(store=store, engine=engine, ingestor=Ingestor(store), now=now)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # The trace goes to the server log, never to the client.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; the server log has the details")

    app.include_router(native.router)
    app.include_router(tenants.router)
    app.include_router(dashboard.router)
    for router in contracts.routers():
        app.include_router(router)
    for router in compat.routers():  # /openmeter, /lago, /stripe
        app.include_router(router)
    return app
