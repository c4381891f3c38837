"""``GET /metrics`` on the API's own port, for an operator key.

The numbers say how much each route is used and how many events arrive, which is no
customer's business: on the API's port a scrape needs an operator key (Prometheus sends it
with ``authorization: {credentials: <secret>}``). ``serve --metrics-port N`` serves the same
page with no key on a port of its own, to be kept on a private network.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from usagemeter.api.native import caller
from usagemeter.api.responses import ApiError
from usagemeter.metrics import CONTENT_TYPE, Telemetry

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    telemetry: Telemetry | None = getattr(request.app.state, "telemetry", None)
    if telemetry is None:
        raise ApiError(404, "not_found", "metrics are off (serve --no-metrics)")
    if not caller(request).is_operator:
        raise ApiError(403, "forbidden", "scraping /metrics here needs an operator key")
    return Response(telemetry.render(), media_type=CONTENT_TYPE)
