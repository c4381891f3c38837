"""Each seed endpoint's default request (shared/seeds/), as the operator reading one account."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from urllib.parse import quote


@dataclass(frozen=True)
class SeedRequest:
    name: str
    path: str
    headers: dict[str, str]


def seed_requests(secret: str, account: str, key: str, anchor: dt.date) -> list[SeedRequest]:
    """The documented request with no optional parameter, plus ?account= where the operator
    needs to name the account. Seed 002 documents both dates: the last 30 days."""
    acct = quote(account)
    first, last = anchor - dt.timedelta(days=30), anchor - dt.timedelta(days=1)
    return [
        SeedRequest(
            "000 GET /analytics/detail-usage-time",
            f"/analytics/detail-usage-time?account={acct}",
            {"Authorization": f"bearer {secret}", "x-api-version": "2025-09"},
        ),
        SeedRequest(
            "001 GET /keys/{key}/usage",
            f"/keys/{quote(key)}/usage",
            {"Authorization": f"Bearer {secret}"},
        ),
        SeedRequest(
            "002 GET /v1/account/usage/",
            f"/v1/account/usage/?start_date={first}&end_date={last}&account={acct}",
            {"X-Api-Key": secret},
        ),
        SeedRequest(
            "003 GET /v1/accounts/{id}/analytics/usage",
            f"/v1/accounts/{acct}/analytics/usage",
            {"X-API-Key": secret},
        ),
        SeedRequest(
            "004 GET /v1/usage",
            f"/v1/usage?account={acct}",
            {"Authorization": f"Bearer {secret}"},
        ),
    ]
