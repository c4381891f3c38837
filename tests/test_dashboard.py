"""The dashboard page: served at /dashboard, self-contained (nothing is fetched from another
origin, so it works offline), and calling only API paths and parameters the server documents."""

import json
import re
import shutil
import subprocess
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Tenants, event


def page(client: TestClient) -> str:
    response = client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    return response.text


def test_dashboard_is_an_html_page(client: TestClient) -> None:
    html = page(client)
    assert html.lstrip().lower().startswith("<!doctype html>")
    for part in ('id="chart"', 'id="table"', "ak_demo_acme_prod", "demo_operator_secret"):
        assert part in html


def test_root_redirects_to_the_dashboard(client: TestClient) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.is_redirect
    assert response.headers["location"] == "/dashboard"


def test_page_makes_no_external_requests(client: TestClient) -> None:
    html = page(client)
    assert re.findall(r"https?://[^\s\"'<>)`]+", html) == []
    assert not re.search(r"""["'`(=]\s*//[\w.-]+\.\w""", html), "protocol-relative URL"
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", html, re.IGNORECASE), "scripts are inline"
    for href in re.findall(r"<link\b[^>]*\bhref\s*=\s*[\"']([^\"']*)", html, re.IGNORECASE):
        assert href.startswith("data:"), href
    assert "@import" not in html
    # The browser enforces it too: only this origin may be fetched.
    assert "default-src 'none'" in html and "connect-src 'self'" in html


def test_page_calls_only_documented_api_paths(client: TestClient) -> None:
    html = page(client)
    called = set(re.findall(r"""["'`](/v1/[\w/{}.-]*)""", html))
    assert called >= {"/v1/accounts", "/v1/query"}
    paths: dict[str, Any] = client.get("/openapi.json").json()["paths"]
    for path in called:
        assert "get" in paths.get(path, {}), f"{path} is not a documented GET endpoint"
    # Every query parameter the page sends is one /v1/query documents.
    block = re.search(r"const params = \{(.*?)\};", html, re.DOTALL)
    assert block is not None
    sent = set(re.findall(r"(\w+):", block.group(1))) | set(re.findall(r"params\.(\w+) =", html))
    documented = {p["name"] for p in paths["/v1/query"]["get"]["parameters"]}
    assert sent and sent <= documented, sent - documented


def test_query_answers_in_the_shape_the_page_reads(
    client: TestClient, tenants: Tenants, send: Any
) -> None:
    send(
        event("e1", "root", "requests", "2025-03-10T03:30:00Z"),  # 23:30 on the 9th in New York
        event("e2", "child", "requests", "2025-03-10T15:00:00Z"),
    )
    params = {
        "metric": "requests",
        "account": "root",
        "start": "2025-03-09T05:00:00Z",
        "end": "2025-03-11T04:00:00Z",
        "granularity": "day",
        "tz": "America/New_York",
        "group_by": "subaccount",
        "include_subaccounts": "true",
    }
    response = client.get("/v1/query", params=params, headers=tenants.headers("root"))
    assert response.status_code == 200, response.text
    body = response.json()
    # Bucket labels are the local part of these strings: New York's DST began on March 9.
    assert [b["start"] for b in body["buckets"]] == [
        "2025-03-09T00:00:00-05:00",
        "2025-03-10T00:00:00-04:00",
    ]
    assert body["buckets"][0]["groups"] == [{"group": {"subaccount": "root"}, "value": 1}]
    assert body["total"] == 2

    bad = client.get(
        "/v1/query", params={**params, "tz": "Mars/Olympus"}, headers=tenants.headers("root")
    )
    assert bad.status_code == 400
    assert "tz" in bad.json()["error"]["message"]


def test_average_per_day_counts_from_the_first_day_with_usage(client: TestClient) -> None:
    """Issue 11.15: 90 days shown, none used before day 31: the average is over the 60 days
    from the first with usage (idle days after it count), and the page says so."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script cannot run here")
    html = page(client)
    function = re.search(r"function averageSinceFirstUsage\(rows\) \{.*?\n  \}", html, re.S)
    assert function is not None
    rows = [{"total": None}] * 29 + [{"total": 0}] + [{"total": 2}] * 30 + [{"total": 0}] * 30
    script = f"{function.group(0)}\nconsole.log(JSON.stringify(averageSinceFirstUsage({rows!r})))"
    script = script.replace("None", "null").replace("'", '"')
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"value": 1, "count": 60, "skipped": 30}
    assert "from the first with usage" in html
