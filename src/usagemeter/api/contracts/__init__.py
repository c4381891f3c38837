"""Seed endpoint contracts: each parses its parameters into a Query, renders the Result in its
own shape and formats its errors in its own envelope. None of them touches SQL.

Each module here exposes ``router`` (a FastAPI APIRouter); the app includes them all.
"""

from __future__ import annotations

import importlib
import pkgutil

from fastapi import APIRouter


def routers() -> list[APIRouter]:
    """The router of every contract module in this package, in name order."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        router = getattr(module, "router", None)
        if isinstance(router, APIRouter):
            found.append(router)
    return found
