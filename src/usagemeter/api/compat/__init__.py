"""The peers' APIs, each under its own prefix, so a provider moving from OpenMeter, Lago or
Stripe meters changes only its client's base URL. Each module maps the peer's events onto the
native ingest (same validation, tenancy, dedupe and atomicity) and answers in the peer's
shapes and error envelopes."""

from __future__ import annotations

from fastapi import APIRouter

from usagemeter.api.compat import lago, openmeter, stripe


def routers() -> list[APIRouter]:
    return [openmeter.router, lago.router, stripe.router]
