"""OpenAPI pieces for bodies and responses we encode and decode with msgspec ourselves."""

from __future__ import annotations

from typing import Any

import msgspec


def standalone_schema(model: type[Any]) -> dict[str, Any]:
    """The model's JSON schema with its nested structs inlined, so it stands on its own in
    an OpenAPI document (whose components know nothing of msgspec's ``$defs``)."""
    full = msgspec.json.schema(model)
    defs = full.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    schema: dict[str, Any] = inline(full)
    return schema
