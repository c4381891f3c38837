"""serve's settings from a TOML file and the environment, config check, and JSON logs
(issue 18, item 5)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.test_security_serve import free_port
from usagemeter.auth import issue_key
from usagemeter.cli import app
from usagemeter.jsonlogs import JsonFormatter
from usagemeter.logs import RedactSecrets
from usagemeter.model import Scope
from usagemeter.store.sqlite import SQLiteStore

runner = CliRunner(env={"COLUMNS": "200"})
PASSWORD = "hunter2-not-shown"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def check(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, ["config", "check", *args], env=env)


def settings(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = check(*args, "--json", env=env)
    assert result.exit_code == 0, result.output
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def test_file_then_environment_then_default(tmp_path: Path) -> None:
    file = write(
        tmp_path / "um.toml",
        f'store = "postgresql://usage:{PASSWORD}@db:5432/usage"\n'
        "port = 9001\nmetrics-port = 9100\nmax_future_hours = 2.5\nlog-format = 'json'\n",
    )
    found = settings(file, env={"USAGEMETER_PORT": "9002", "USAGEMETER_NO_SUCH": "1"})
    assert found["store"] == {
        "value": "postgresql://usage:***@db:5432/usage",
        "from": "config file",
    }
    assert found["port"] == {"value": 9002, "from": "environment"}  # the environment wins
    assert found["metrics-port"] == {"value": 9100, "from": "config file"}
    assert found["max-future-hours"] == {"value": 2.5, "from": "config file"}
    assert found["log-format"] == {"value": "json", "from": "config file"}
    assert found["host"] == {"value": "127.0.0.1", "from": "default"}
    assert "config" not in found
    # The file named by USAGEMETER_CONFIG, and the table form: never the password.
    table = check(env={"USAGEMETER_CONFIG": file})
    assert table.exit_code == 0, table.output
    assert "9100" in table.output and "config file" in table.output
    assert PASSWORD not in table.output


def test_every_serve_option_has_an_environment_variable(tmp_path: Path) -> None:
    found = settings(
        env={
            "USAGEMETER_STORE": str(tmp_path / "x.db"),
            "USAGEMETER_HEADER_TIMEOUT": "3",
            "USAGEMETER_METRICS": "false",
            "USAGEMETER_METRICS_ACCOUNTS": "true",
            "USAGEMETER_LIMIT_CONCURRENCY": "50",
        }
    )
    assert found["store"]["value"] == str(tmp_path / "x.db")
    assert found["header-timeout"] == {"value": 3.0, "from": "environment"}
    assert found["metrics"] == {"value": False, "from": "environment"}
    assert found["metrics-accounts"] == {"value": True, "from": "environment"}
    assert found["limit-concurrency"] == {"value": 50, "from": "environment"}


@pytest.mark.parametrize(
    "text, says",
    [
        (
            "prot = 1\nbacklg = 5\n",
            ["prot: not a setting of serve (did you mean 'port'?)", "backlg"],
        ),
        ("port = [1, 2]\n", ["port: give one value"]),
        ("port = \n", ["not valid TOML"]),
        ("backlog = 0\n", ["--backlog", "greater than or equal to 1"]),
        ("log-format = 'xml'\n", ["--log-format", "xml"]),
    ],
)
def test_a_bad_file_says_what_to_fix(tmp_path: Path, text: str, says: list[str]) -> None:
    result = check(write(tmp_path / "bad.toml", text))
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    for part in says:
        assert part in message, message


def test_a_missing_file(tmp_path: Path) -> None:
    result = check(str(tmp_path / "nope.toml"))
    assert result.exit_code == 2
    assert "cannot read it" in result.output


def test_json_log_lines_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("usagemeter.test_json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.addFilter(RedactSecrets())
    secret = "ak_" + "Abcdefghijklmnopqrstuvwxyz012345"
    try:
        try:
            raise RuntimeError(f"bad key {secret}")
        except RuntimeError:
            logger.exception("GET %s", f"/keys/{secret}/usage?user_token={secret}")
    finally:
        logger.removeHandler(handler)
    line = json.loads(capsys.readouterr().err)
    assert line["level"] == "error" and line["logger"] == "usagemeter.test_json"
    assert line["message"] == "GET /keys/{key}/usage?user_token=***"
    assert "RuntimeError" in line["error"]
    assert secret not in json.dumps(line)


def test_serve_runs_as_its_config_file_says(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    store = SQLiteStore(db)
    secret = issue_key(store, None, scopes=[Scope.OPERATOR])[1]
    store.close()
    port, metrics_port = free_port(), free_port()
    file = write(
        tmp_path / "um.toml",
        f'store = "{db}"\nport = {port}\nmetrics-port = {metrics_port}\n'
        "access-log = true\nlog-format = 'json'\n",
    )
    env = {**os.environ, "USAGEMETER_CONFIG": file}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "usagemeter", "serve"], env=env, stdout=out, stderr=out
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        httpx.get(f"{base}/keys/{secret}/usage", params={"user_token": secret})
        scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")  # no key on its port
        assert scrape.status_code == 200
        assert 'route="/keys/{key}/usage"' in scrape.text
        assert httpx.get(f"{base}/metrics").status_code == 401  # the API's port wants a key
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = log.read_text()
    assert secret not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert any("/keys/{key}/usage?user_token=***" in line["message"] for line in access), text
