"""What the server logs, without the secrets some endpoints carry in their URLs.

``GET /keys/{key}/usage`` may name a key by its full secret, and takes the caller's secret as
``?user_token=`` (seed 001): an access log line would otherwise keep both in plain text.
"""

from __future__ import annotations

import logging
import re

_KEY_PATH = re.compile(r"/keys/[^/?\s\"]+/usage")
_TOKEN = re.compile(r"(user_token=)[^&\s\"]*")


def redact(text: str) -> str:
    """``/keys/ak_secret/usage?user_token=s`` -> ``/keys/{key}/usage?user_token=***``."""
    return _TOKEN.sub(r"\1***", _KEY_PATH.sub("/keys/{key}/usage", text))


class RedactSecrets(logging.Filter):
    """A filter for uvicorn's access log: rewrites the request line's path in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        record.msg = redact(str(record.msg))
        return True


def install() -> None:
    logging.getLogger("uvicorn.access").addFilter(RedactSecrets())
