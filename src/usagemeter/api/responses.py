"""JSON responses and the native error envelope."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response


class JSONResponse(Response):
    """JSON encoded by msgspec: the same output as the stdlib's, several times faster."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def number(value: float) -> int | float:
    """Whole numbers as integers: a count of 3 is ``3``, not ``3.0``."""
    return int(value) if float(value).is_integer() else value


class ApiError(Exception):
    """An error of the native API: ``{"error": {"code", "message", "details"}}``."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    def response(self) -> JSONResponse:
        body = {"error": {"code": self.code, "message": self.message, "details": self.details}}
        return JSONResponse(body, status_code=self.status)


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None
) -> JSONResponse:
    return ApiError(status, code, message, details).response()
