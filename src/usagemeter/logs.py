"""What the server logs, without the secrets some requests carry in their URLs.

``GET /keys/{key}/usage`` may name a key by its full secret, and takes the caller's secret as
``?user_token=`` (seed 001); a client may also paste a secret anywhere by mistake. Three rules,
applied to every log line after percent-decoding (the server decodes before it matches, so
``user%5Ftoken`` authenticates exactly like ``user_token``):

- the key segment of ``/keys/{key}/usage`` is never logged;
- the value of a query parameter named like a credential (``user_token``, ``token``,
  ``api_key``, ... in any case, any percent-spelling) is never logged;
- anything shaped like one of our secrets (32+ URL-safe characters with a capital letter, as
  ``issue_key`` makes them: a prefix and 24 random bytes) is masked wherever it appears.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

MASK = "***"
# The server decodes %2F in a path before routing, so either spelling of the slashes.
_KEY_PATH = re.compile(r"(?i)/keys(?:/|%2f)(?:(?!%2f)[^/?\s\"])+(?:/|%2f)usage")
# A query parameter: its name and value as sent, still percent-encoded.
_PARAM = re.compile(r"([?&;])([^=&;\s\"#]*)=([^&;\s\"#]*)")
CREDENTIAL_PARAMS = frozenset(
    {"user_token", "token", "access_token", "api_key", "apikey", "key_secret", "secret"}
)
# A run of URL-safe characters, some possibly percent-encoded: decoded before it is judged.
_RUN = re.compile(r"(?:[A-Za-z0-9_\-]|%[0-9A-Fa-f]{2})+")
# The random part of a secret is 32 URL-safe characters (token_urlsafe(24)); one without a
# capital letter turns up about once in twenty million, so hex ids and UUIDs stay readable.
_SECRET = re.compile(r"(?=[A-Za-z0-9_\-]*[A-Z])[A-Za-z0-9_\-]{32,}")


def _param(match: re.Match[str]) -> str:
    sep, name, value = match[1], match[2], match[3]
    normal = unquote_plus(name).strip().casefold().replace("-", "_")
    if normal in CREDENTIAL_PARAMS and value:
        return f"{sep}{name}={MASK}"
    return match[0]


def _run(match: re.Match[str]) -> str:
    text = match[0]
    if _SECRET.search(text):
        return MASK
    # Judged decoded too: "um_%41bc..." is the secret "um_Abc..." to the server.
    return MASK if "%" in text and _SECRET.search(unquote_plus(text)) else text


def redact(text: str) -> str:
    """``/keys/ak_secret/usage?user_token=s`` -> ``/keys/{key}/usage?user_token=***``."""
    text = _KEY_PATH.sub("/keys/{key}/usage", text)
    text = _PARAM.sub(_param, text)
    return _RUN.sub(_run, text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message, arguments and traceback text in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if not record.args:
            record.msg = redact(str(record.msg))
        else:
            # The format is never rewritten on its own: "/keys/%s/usage" would lose its %s.
            # The whole line is judged instead, as a secret may span format and arguments,
            # and replaces both only when something in it must go (uvicorn's access format
            # never does, and its formatter reads the arguments).
            try:
                whole = record.getMessage()
            except (TypeError, ValueError, KeyError):  # a malformed call: keep its parts
                record.msg, record.args = redact(f"{record.msg} {record.args!r}"), ()
            else:
                if redact(whole) != whole:
                    record.msg, record.args = redact(whole), ()
        if record.exc_info and not record.exc_text:
            # Formatted here so that an exception's message (which may quote a request)
            # is redacted too; handlers print exc_text as it is.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


LOGGERS = ("uvicorn.access", "uvicorn.error", "usagemeter")


def install() -> None:
    """Filter every logger the server writes through (call after uvicorn set its own up)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
