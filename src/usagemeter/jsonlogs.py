"""``serve --log-format json``: one JSON object per log line, for log collectors.

The secrets filter (logs.py) rewrites a record before any handler formats it, so a JSON line
holds only what a text line would; the message is redacted once more here all the same,
since a JSON line is what gets shipped off the machine.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from enum import StrEnum

from usagemeter import logs


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": logs.redact(record.getMessage()),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["error"] = logs.redact(record.exc_text)
        return json.dumps(line)


def use_json() -> None:
    """Every handler of the server's loggers writes JSON; the ``usagemeter`` logger, which
    uvicorn does not set up, gets a stderr handler of its own."""
    formatter = JsonFormatter()
    ours = logging.getLogger("usagemeter")
    if not ours.handlers:
        ours.addHandler(logging.StreamHandler())
        ours.propagate = False
        ours.setLevel(logging.INFO)
    for name in ("uvicorn", *logs.LOGGERS):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)
