"""The README is a test: its curl calls run against a real server started the way the quick
start starts it, and every endpoint and command it should name, it names."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from usagemeter.cli import app as cli_app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def curl_commands() -> list[list[str]]:
    """Every curl call in the README's sh blocks, as argument lists."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        text = re.sub(r"\\\n\s*", " ", block)  # join continued lines
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("curl "):
                commands.append(shlex.split(line))
    return commands


def as_request(argv: list[str]) -> tuple[str, str, dict[str, str], str | None]:
    method, url, headers, data = "GET", "", {}, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg in ("-d", "--data"):
            data = next(args)
            method = "POST" if method == "GET" else method
        elif arg.startswith("http"):
            url = arg
    return method, url, headers, data


SERVER_LOG: list[str] = []  # what the module's server printed, line by line


def _collect(stream: Any) -> None:
    for line in iter(stream.readline, b""):
        SERVER_LOG.append(line.decode(errors="replace"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``usagemeter serve --demo``, as ``make serve`` runs it, on a free port."""
    port = free_port()
    db = tmp_path_factory.mktemp("readme") / "usagemeter.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "usagemeter",
            "serve",
            "--demo",
            "--db",
            str(db),
            "--port",
            str(port),
            "--access-log",  # on, to check what it keeps
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    assert proc.stdout is not None
    reader = threading.Thread(target=_collect, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            assert proc.poll() is None, "".join(SERVER_LOG)
        else:
            pytest.fail("the server did not start within 60 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reader.join(timeout=10)
        proc.stdout.close()


def test_the_quick_start_commands_are_the_makefile_targets() -> None:
    quick = re.search(r"## Quick start\n\n```sh\n(.*?)```", README, re.S)
    assert quick is not None
    commands = [line.split("#")[0].strip() for line in quick.group(1).strip().splitlines()]
    assert commands == ["make serve", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "usagemeter serve --demo" in makefile
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_every_curl_call_in_the_readme_works(server: str) -> None:
    commands = curl_commands()
    assert len(commands) >= 4
    answers: list[Any] = []
    with httpx.Client(timeout=30) as http:
        for argv in commands:
            method, url, headers, data = as_request(argv)
            url = url.replace("http://127.0.0.1:8000", server)
            response = http.request(method, url, headers=headers, content=data)
            assert response.status_code < 300, (
                f"{' '.join(argv)}\n-> {response.status_code} {response.text}"
            )
            answers.append(response.json())
        # The walk-through: the event sent is the one the next query finds.
        assert answers[0] == {"accepted": 1, "duplicates": 0, "conflicts": 0, "conflicting": []}
        assert answers[1]["total"] == 1
        method, url, headers, data = as_request(commands[0])
        again = http.request(
            method, url.replace("http://127.0.0.1:8000", server), headers=headers, content=data
        )
        assert again.json() == {"accepted": 0, "duplicates": 1, "conflicts": 0, "conflicting": []}


def test_every_endpoint_is_in_the_readme(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    endpoints = README.split("## Endpoints", 1)[1]
    for path, methods in paths.items():
        for method in methods:
            named = f"{method.upper()} {path}"
            # Paths may be written with their own placeholders ({id} for {account_id}).
            pattern = re.sub(r"\\\{[^}]*\\\}", r"\\{[^}]*\\}", re.escape(named))
            assert re.search(pattern, endpoints), f"README does not list {named}"


def test_every_command_is_in_the_readme() -> None:
    import typer.main

    group = typer.main.get_command(cli_app)
    names = []
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        sub = getattr(command, "commands", None)
        names.extend(f"{name} {s}" for s in sub) if sub else names.append(name)
    for name in names:
        assert f"usagemeter {name}" in README or re.search(
            rf"usagemeter {name.split()[0]} .*{name.split()[-1]}", README
        ), f"README does not document `usagemeter {name}`"


def test_the_access_log_keeps_no_secrets(server: str) -> None:
    """Seed 001 takes secrets in its path and query; the server's log must not keep them."""
    # Only this test's lines: an earlier /healthz (the server's start waits for one) must
    # not end the wait before the request's own line is read.
    before = len(SERVER_LOG)
    httpx.get(f"{server}/keys/ak_demo_acme_prod/usage?user_token=demo_operator_secret", timeout=10)
    httpx.get(f"{server}/healthz", timeout=10)  # a line after it, so the one before is flushed
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
        "/healthz" in line for line in SERVER_LOG[before:]
    ):
        time.sleep(0.05)
    requests = [line for line in SERVER_LOG[before:] if '"GET ' in line]
    assert any("GET /keys/{key}/usage?user_token=***" in line for line in requests), requests
    assert not any(
        "ak_demo_acme_prod" in line or "demo_operator_secret" in line for line in requests
    )
