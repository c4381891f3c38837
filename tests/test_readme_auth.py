"""Issue 11.14: the README says, endpoint by endpoint, which header carries the key and what
an error looks like; checked against what each endpoint documents in its OpenAPI entry."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _rows() -> list[str]:
    table = README.split("| endpoint | the key goes in | an error looks like |", 1)[1]
    return [line for line in table.strip().splitlines() if line.startswith("|")][1:]


def test_each_endpoint_names_its_key_header_and_error_shape(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    rows = _rows()
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            if not operation.get("security"):
                continue  # the native API: its own row
            named = f"`{method.upper()} {path}`"
            [row] = [r for r in rows if named in r.split("|")[1]]
            key_cell, error_cell = (cell.strip().lower() for cell in row.split("|")[2:4])
            for requirement in operation["security"]:
                for scheme_name in requirement:
                    scheme = schemes[scheme_name]
                    header = (
                        scheme["name"].lower()
                        if scheme["type"] == "apiKey"
                        else "authorization: bearer"
                    )
                    assert header in key_cell, (named, header)
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "header" and parameter.get("required"):
                    assert parameter["name"].lower() in key_cell, (named, parameter["name"])
            assert "{" in error_cell, f"{named}: no error shape"
    native = [r for r in rows if "/v1/query" in r.split("|")[1]]
    assert native and "authorization: bearer" in native[0].lower()
    assert "Every request carries `Authorization: Bearer" not in README
