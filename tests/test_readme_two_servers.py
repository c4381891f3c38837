"""The PostgreSQL store's promise, as a user meets it: with USAGEMETER_STORE naming one
database, two `usagemeter serve` processes give every README example the same answer, and
what one of them was sent is in the other's next answer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import make_database
from tests.test_readme import as_request, curl_commands
from tests.test_two_processes import Server


def _ask(http: httpx.Client, server: Server, argv: list[str]) -> tuple[int, Any]:
    method, url, headers, data = as_request(argv)
    url = url.replace("http://127.0.0.1:8000", server.base)
    response = http.request(method, url, headers=headers, content=data)
    return response.status_code, response.json()


# A default range ends at the moment asked (to the millisecond), so two servers asked one
# after the other answer for windows a few milliseconds apart: those moments are masked.
MOMENT = re.compile(r'"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(?:Z|[+-]\d\d:\d\d)"')


def _ask_both(
    http: httpx.Client, first: Server, second: Server, argv: list[str]
) -> tuple[tuple[int, str], tuple[int, str]]:
    """Both servers' answers, moments masked. Asked again when they differ: an event within
    the milliseconds between the two windows would part them once, never twice in a row,
    where a real difference between the servers stays."""
    for _ in range(3):
        answers = []
        for server in (first, second):
            status, answer = _ask(http, server, argv)
            answers.append((status, MOMENT.sub('"<moment>"', json.dumps(answer, sort_keys=True))))
        if answers[0] == answers[1]:
            break
    return answers[0], answers[1]


def test_every_readme_example_answers_alike_from_two_servers(
    postgres_server: str, tmp_path: Path
) -> None:
    url = make_database(postgres_server, "usagemeter_readme_two_servers")
    first = Server(url, tmp_path / "first.log", "--demo")  # as `make serve`, on PostgreSQL
    second = Server(url, tmp_path / "second.log")
    servers = (first, second)
    try:
        commands = curl_commands()
        writes = 0
        with httpx.Client(timeout=30) as http:
            for argv in commands:
                if "-d" in argv or "-X" in argv:
                    # A write goes to one server, by turns; the reads after it ask both.
                    status, answer = _ask(http, servers[writes % 2], argv)
                    writes += 1
                    assert status < 300, f"{' '.join(argv)}\n-> {status} {answer}"
                    continue
                here, there = _ask_both(http, first, second, argv)
                assert here[0] < 300, f"{' '.join(argv)}\n-> {here}"
                assert here == there, f"{' '.join(argv)}: the two servers differ"
            # The walk-through's event, sent again to the server that did not take it, is a
            # duplicate there: ids count once across processes.
            status, again = _ask(http, second, commands[0])
            assert status == 200
            assert again == {"accepted": 0, "duplicates": 1, "conflicts": 0, "conflicting": []}
        assert writes >= 1
    finally:
        for server in servers:
            server.stop()
