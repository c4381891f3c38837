"""``usagemeter serve``'s settings from a TOML file and the environment.

Every ``serve`` option can be given three more ways than on the command line, and the first
that gives it wins: the command line, an environment variable (``USAGEMETER_`` and the
option's name, ``--max-future-hours`` as ``USAGEMETER_MAX_FUTURE_HOURS``; the store also as
``USAGEMETER_STORE`` or ``USAGEMETER_DB``), the config file (``--config FILE`` or
``USAGEMETER_CONFIG``), then the built-in default. The file holds the options by name at its
top level, with ``-`` or ``_``::

    store = "postgresql://usage:secret@db:5432/usage"
    host = "0.0.0.0"
    port = 8000
    metrics-port = 9100
    log-format = "json"

This is click's own order (command line, environment, ``default_map``, default): the file
only fills click's ``default_map``, so the values go through the same checks as typed ones.
"""

from __future__ import annotations

import difflib
import tomllib
from enum import Enum
from pathlib import Path
from typing import Any

# typer builds its commands on its own copy of click; settings are read with the same classes.
from typer import _click as click
from typer._click.core import ParameterSource
from typer._click.exceptions import BadParameter

from usagemeter.store import redact

ENV_PREFIX = "USAGEMETER"  # serve's options read USAGEMETER_<NAME> (click's auto envvar)
CONFIG_ENV = "USAGEMETER_CONFIG"
_NOT_SETTINGS = frozenset({"config_file", "help"})  # --config is where they come from


class ConfigError(ValueError):
    """A config file that cannot be used; the message lists every problem in it."""


def _options(command: click.Command) -> dict[str, click.Parameter]:
    """The command's settable parameters, by every name a file may use for them."""
    names: dict[str, click.Parameter] = {}
    for param in command.params:
        if param.name is None or param.name in _NOT_SETTINGS:
            continue
        names[param.name] = param
        for flag in param.opts:
            if flag.startswith("--"):
                names[flag[2:].replace("-", "_")] = param
    return names


def load(path: str | Path, command: click.Command) -> dict[str, Any]:
    """The file's settings for ``command``, by parameter name. ConfigError names every
    unknown setting at once; the values are checked as the command line's are, when the
    command runs (or ``config check`` tries it)."""
    try:
        data = tomllib.loads(Path(path).read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    options = _options(command)
    settings: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in data.items():
        param = options.get(key.replace("-", "_"))
        if param is None:
            close = difflib.get_close_matches(key.replace("-", "_"), list(options), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{key}: not a setting of {command.name}{hint}")
            continue
        if isinstance(value, dict | list) and not getattr(param, "multiple", False):
            problems.append(f"{key}: give one value, not a table or a list")
            continue
        assert param.name is not None
        settings[param.name] = value
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return settings


def use_file(ctx: click.Context, param: Any, value: str | None) -> str | None:
    """Callback of an eager ``--config`` option: the file's settings become the command's
    defaults, below the command line and the environment."""
    if value:
        try:
            settings = load(value, ctx.command)
        except ConfigError as exc:
            raise BadParameter(str(exc), ctx, param) from None
        ctx.default_map = {**(ctx.default_map or {}), **settings}
    return value


def shown(name: str, value: Any) -> Any:
    """A setting as ``config check`` prints it: a store URL without its password."""
    if name == "db" and isinstance(value, str):
        return redact(value)
    return value.value if isinstance(value, Enum) else value


def effective(command: click.Command, path: str | None) -> list[tuple[str, Any, str]]:
    """Each setting of ``command`` as it would run now: its option, value and where the value
    came from (``environment``, ``config file``, ``default``). ConfigError if it would not."""
    args = ["--config", path] if path else []
    try:
        ctx = command.make_context(command.name, args, auto_envvar_prefix=ENV_PREFIX)
    except click.ClickException as exc:
        raise ConfigError(exc.format_message()) from None
    sources = {
        ParameterSource.ENVIRONMENT: "environment",
        ParameterSource.DEFAULT_MAP: "config file",
        ParameterSource.DEFAULT: "default",
        ParameterSource.COMMANDLINE: "command line",
    }
    rows = []
    for param in command.params:
        if param.name is None or param.name in _NOT_SETTINGS:
            continue
        source = ctx.get_parameter_source(param.name)
        flag = next((o for o in param.opts if o.startswith("--")), param.name)
        where = sources.get(source, "default") if source is not None else "default"
        rows.append((flag, shown(param.name, ctx.params.get(param.name)), where))
    return rows
