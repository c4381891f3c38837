"""Strict parsing of the query parameters every endpoint shares: integers and list caps.

``int()`` and ``str.isdigit()`` are too lenient for input from the network: ``isdigit`` is
true for "²" (which ``int`` then refuses), ``int`` reads "٣" and "1_000", and a
5,000-digit string raises instead of answering. Only ASCII digits count here, and their
length is bounded before any arithmetic.
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"([+-]?)([0-9]+)", re.ASCII)
CLAMP = 10**18  # beyond any bound an endpoint checks; a longer number is clamped to it
MAX_FILTERS = 20  # filter= parameters per query
MAX_GROUP_BY = 8  # group-by dimensions per query
MAX_TAGS = 20  # tags per query


def ascii_int(text: str) -> int | None:
    """An optional sign and ASCII digits -> int, clamped to +-10**18 (so any range check
    still fails it with its own message); None for anything else."""
    m = _INTEGER.fullmatch(text.strip())
    if m is None:
        return None
    digits = m[2].lstrip("0") or "0"
    value = CLAMP if len(digits) > 18 else int(digits)
    return -value if m[1] == "-" else value
