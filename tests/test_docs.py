"""Issue 11.5: /docs and /redoc work offline: every asset they load is served by us."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_assets_we_serve(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert not re.search(r"https?://|['\"]//", html), "a URL to another host"
    referenced = set(re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html))
    referenced |= set(re.findall(r"""url\s*:\s*['"]([^'"]+)""", html))  # Swagger UI's spec
    referenced |= set(re.findall(r"""spec-url\s*=\s*["']([^"']+)""", html))  # ReDoc's
    scripts = [r for r in referenced if r.endswith(".js")]
    assert scripts, "the page loads its viewer from somewhere"
    assert "/openapi.json" in referenced
    for asset in referenced:
        assert asset.startswith("/"), asset
        served = client.get(asset)
        assert served.status_code == 200, asset
        assert len(served.content) > 100, asset
