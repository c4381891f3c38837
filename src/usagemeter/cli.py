"""The ``usagemeter`` command: serve, accounts, keys, ingest, query, export, demo (and, in
cli_corrections.py, void, amend, voids, retain, compact).

Every command but ``serve`` works on the database file directly (SQLite in WAL mode lets it
run beside a live server).
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections import deque
from concurrent.futures import Future
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table
from typer._click.globals import get_current_context

from usagemeter import config, jsonlogs, logs
from usagemeter import demo as demo_data
from usagemeter.auth import issue_key
from usagemeter.backup import RestoreRefused, account_records, load_record, restore
from usagemeter.corrections import RawDropped
from usagemeter.engine import Engine
from usagemeter.ingest import MAX_BATCH, MAX_FUTURE, BatchRejected, Ingestor
from usagemeter.limitmodel import Limit
from usagemeter.limits import InvalidLimit, build_limit, new_limit_id, wall_ms
from usagemeter.meters import MeterRegistry, parse_aggregation
from usagemeter.model import Account, AppendResult, Event, Query, Result, Scope
from usagemeter.records import (
    CsvRecords,
    Record,
    RecordError,
    count_lines,
    ndjson_blocks,
    ndjson_record,
    where,
)
from usagemeter.serving import ServeLimits, collector_tuned
from usagemeter.store import open_store, redact, sqlite_path
from usagemeter.store.base import Conflict, NotFound, Store
from usagemeter.store.sqlite import SQLiteStore
from usagemeter.timewindows import (
    BillingCycle,
    Granularity,
    from_ms,
    isoformat,
    parse_instant,
    parse_zone,
)

app = typer.Typer(
    help="Self-hosted usage metering and usage analytics.",
    no_args_is_help=True,
    rich_markup_mode="markdown",  # a docstring's paragraphs rewrapped, not its line breaks kept
)
accounts_app = typer.Typer(help="Create and list accounts.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")
app.add_typer(keys_app, name="keys")
console = Console()
err = Console(stderr=True)

DEFAULT_DB = "usagemeter.db"
DbOption = Annotated[
    str,
    typer.Option(
        "--store",
        "--db",
        envvar=["USAGEMETER_STORE", "USAGEMETER_DB"],
        help="Where usage is kept: a SQLite file (a path or sqlite:///path, created when"
        " missing), postgresql://user:password@host:5432/db, chdb:///dir or"
        " clickhouse://user:password@host:8123/db.",
    ),
]
MetersOption = Annotated[
    str | None,
    typer.Option("--meters", envvar="USAGEMETER_METERS", help="JSON file of meter overrides."),
]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


def _open(url: str) -> Store:
    """The store --store (or --db) names, or a clear error and exit 2."""
    try:
        store = open_store(url)
    except (ValueError, ConnectionError) as exc:
        raise _fail(str(exc)) from None
    # Closed when the command ends (its click context closes: also when a test's runner
    # invokes it in this process), so that a PostgreSQL store's pool ends its connections
    # while the server is still there; at exit when no command runs it.
    command = get_current_context(silent=True)
    if command is None:
        atexit.register(store.close)
    else:
        command.call_on_close(store.close)
    return store


def _sqlite_file(url: str, command: str) -> str:
    """The SQLite file a --store URL names; backup and restore copy files, so another store
    gets an error that names its own tools."""
    try:
        path = sqlite_path(url)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if path is None:
        raise _fail(
            f"{command} copies a SQLite file; for {redact(url)} use the database's own tools"
            " (pg_dump / pg_restore for PostgreSQL)"
        )
    return path


def _meters(path: str | None) -> MeterRegistry:
    try:
        return MeterRegistry.from_file(path) if path else MeterRegistry()
    except ValueError as exc:
        raise _fail(str(exc)) from None


# The web app's modules (FastAPI, pydantic) take about half a second to import: the few
# commands that print what an endpoint answers import them when they run, so that the
# others (`ingest` of a file, say) start without them.
def _query_json(result: Result) -> dict[str, Any]:
    from usagemeter.api.native import query_json

    return query_json(result)


def _limit_json(limit: Limit) -> dict[str, Any]:
    from usagemeter.api.limits import limit_json

    return limit_json(limit)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def _number(value: float) -> str:
    """Exact, with thousands separators: 1278954 is 1,278,954, never 1.27895e+06."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,}"


def _id_column(name: str, ids: list[str]) -> Column:
    """A column that never cuts an id short or breaks it, whatever the terminal's width:
    the row's id is what the next command (keys revoke, --account) needs whole."""
    return Column(name, no_wrap=True, min_width=max([len(name), *map(len, ids)]))


def _folded(name: str) -> Column:
    """Any other cell (an owner's id, a name, a time): folded onto more lines when the
    terminal is narrow, never cut short with an ellipsis."""
    return Column(name, overflow="fold")


# Every serve option is also read from USAGEMETER_<NAME> and the --config file (config.py).
@app.command(context_settings={"auto_envvar_prefix": config.ENV_PREFIX})
def serve(
    db: DbOption = DEFAULT_DB,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=0, max=65535)] = 8000,
    demo: Annotated[bool, typer.Option(help="Load demo data first (idempotent).")] = False,
    meters: MetersOption = None,
    access_log: Annotated[
        bool, typer.Option(help="Log every request (secrets in URLs are masked).")
    ] = False,
    max_future_hours: Annotated[
        float,
        typer.Option(
            min=0, help="Refuse events stamped more than this many hours ahead of the clock."
        ),
    ] = MAX_FUTURE / timedelta(hours=1),
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a request's headers may take to arrive.", min=0.1)
    ] = ServeLimits.header_timeout,
    keep_alive: Annotated[
        int, typer.Option(help="Seconds an idle keep-alive connection is kept.", min=1)
    ] = ServeLimits.keep_alive_timeout,
    limit_concurrency: Annotated[
        int | None,
        typer.Option(
            help="Connections at once; more get 503 (default: open-files limit - 64).", min=1
        ),
    ] = None,
    backlog: Annotated[
        int, typer.Option(help="Connections the kernel queues before accept.", min=1)
    ] = ServeLimits.backlog,
    metrics: Annotated[
        bool, typer.Option(help="Serve GET /metrics for Prometheus (operator key).")
    ] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Also serve /metrics with no key on this port (keep it private).", min=0, max=65535
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address the --metrics-port page listens on.")
    ] = "127.0.0.1",
    metrics_accounts: Annotated[
        bool, typer.Option(help="Label ingest metrics with account ids.")
    ] = False,
    log_format: Annotated[
        jsonlogs.LogFormat,
        typer.Option(help="text, or json: one JSON object per line (secrets masked)."),
    ] = jsonlogs.LogFormat.TEXT,
    retain_raw_days: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Drop raw events older than this many days, hourly (rollups stay).",
        ),
    ] = None,
    config_file: Annotated[
        str | None,
        typer.Option(
            "--config",
            envvar=config.CONFIG_ENV,
            is_eager=True,
            callback=config.use_file,
            help="TOML file of serve options; the command line and USAGEMETER_* win over it.",
        ),
    ] = None,
) -> None:
    """Start the HTTP service: native API, seed endpoints, dashboard."""
    import uvicorn

    from usagemeter.api.app import create_app
    from usagemeter.serving import uvicorn_config

    store = _open(db)
    if demo:
        added = demo_data.load_demo(store)
        err.print(f"demo data: {added} new events in {redact(db)}")
        err.print("demo keys (for this demo file only):")
        for key in demo_data.KEYS:
            owner = key.account_id or "operator"
            err.print(f"  {key.secret:<24} {owner}")
    err.print(f"dashboard: http://{host}:{port}/dashboard   API docs: http://{host}:{port}/docs")
    # The access log is off unless asked for: on two cores it cost a sixth of a small
    # request's server time, and errors are logged either way.
    limits = ServeLimits(header_timeout, keep_alive, limit_concurrency, backlog)
    # close_store: a clean shutdown checkpoints, leaving no WAL to replay.
    service = create_app(
        store,
        _meters(meters),
        max_future=timedelta(hours=max_future_hours),
        close_store=True,
        metrics=metrics,
        metrics_accounts=metrics_accounts,
    )
    if metrics_port is not None:
        if not metrics:
            raise _fail("--metrics-port needs metrics on: drop --no-metrics")
        from usagemeter.metrics import serve_apart

        try:
            serve_apart(service.state.telemetry, metrics_host, metrics_port)
        except OSError as exc:
            raise _fail(f"--metrics-port {metrics_port}: {exc.strerror or exc}") from None
        err.print(f"metrics: http://{metrics_host}:{metrics_port}/metrics (no key)")
    if retain_raw_days is not None:
        from usagemeter.store.retention import RetentionJob

        RetentionJob(store, retain_raw_days, lambda: time.time_ns() // 1_000_000).start()
    uv_config = uvicorn_config(service, host, port, access_log, limits)
    server = uvicorn.Server(uv_config)  # its logging is configured now, so the filter sticks
    logs.install()
    if log_format is jsonlogs.LogFormat.JSON:
        jsonlogs.use_json()
    with collector_tuned():
        server.run()


@app.command()
def demo(db: DbOption = DEFAULT_DB) -> None:
    """Load demo accounts, keys and 100 days of usage (idempotent)."""
    added = demo_data.load_demo(_open(db))
    _print_json({"events_added": added, "keys": {k.id: k.secret for k in demo_data.KEYS}})


# ------------------------------------------------------------------ accounts


@accounts_app.command("create")
def accounts_create(
    name: str,
    db: DbOption = DEFAULT_DB,
    id: Annotated[str | None, typer.Option(help="Your own id for it (default: generated).")] = None,
    parent: Annotated[str | None, typer.Option(help="Parent account id.")] = None,
    anchor: Annotated[str | None, typer.Option(help="Billing cycle anchor, YYYY-MM-DD.")] = None,
    period: Annotated[str, typer.Option(help="Billing period: month or year.")] = "month",
) -> None:
    """Create an account and print it as JSON."""
    import secrets

    try:
        cycle = BillingCycle(date.fromisoformat(anchor), period) if anchor else None
    except ValueError as exc:
        raise _fail(f"--anchor/--period: {exc}") from None
    account = Account(id or "acct_" + secrets.token_hex(8), name, parent, cycle)
    try:
        created = _open(db).create_account(account)
    except (NotFound, Conflict) as exc:
        raise _fail(str(exc)) from None
    _print_json({"id": created.id, "name": created.name, "parent_id": created.parent_id})


@accounts_app.command("list")
def accounts_list(db: DbOption = DEFAULT_DB, as_json: JsonOption = False) -> None:
    """List every account."""
    accounts = _open(db).list_accounts()
    if as_json:
        _print_json(
            [
                {
                    "id": a.id,
                    "name": a.name,
                    "parent_id": a.parent_id,
                    "billing_cycle": {
                        "anchor": str(a.billing_cycle.anchor),
                        "period": a.billing_cycle.period,
                    }
                    if a.billing_cycle
                    else None,
                }
                for a in accounts
            ]
        )
        return
    ids = [a.id for a in accounts]
    table = Table(
        _id_column("id", ids), _folded("name"), _folded("parent"), _folded("billing cycle")
    )
    for a in accounts:
        cycle = f"{a.billing_cycle.period} from {a.billing_cycle.anchor}" if a.billing_cycle else ""
        table.add_row(a.id, a.name, a.parent_id or "", cycle)
    console.print(table)


# ---------------------------------------------------------------------- keys


# Scopes an account key may have: every scope but operator, whichever the model defines.
ACCOUNT_SCOPES = [s.value for s in Scope if s is not Scope.OPERATOR]


def _scopes(values: list[str]) -> list[Scope]:
    """``--scope read --scope ingest`` and ``--scope read,ingest`` alike."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in ACCOUNT_SCOPES]
    if unknown or not names:
        raise _fail(
            f"--scope: {', '.join(map(repr, unknown)) or 'nothing given'}; use"
            f" {', '.join(ACCOUNT_SCOPES)}, repeated or comma-separated"
        )
    return [Scope(n) for n in names]


@keys_app.command("create")
def keys_create(
    db: DbOption = DEFAULT_DB,
    operator: Annotated[bool, typer.Option("--operator", help="An operator key.")] = False,
    account: Annotated[str | None, typer.Option(help="The account the key belongs to.")] = None,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    prefix: Annotated[str, typer.Option(help="Secret prefix, e.g. ak_.")] = "um_",
    scope: Annotated[
        list[str] | None,
        typer.Option(
            help=f"{', '.join(ACCOUNT_SCOPES)} (default read): repeat the flag or separate"
            " with commas, --scope read,ingest."
        ),
    ] = None,
) -> None:
    """Create a key and print it as JSON. The secret (key) is shown only here."""
    if operator == (account is not None):
        raise _fail("give exactly one of --operator or --account ID")
    try:
        scopes = [Scope.OPERATOR] if operator else _scopes(scope or ["read"])
        created, secret = issue_key(_open(db), account, name=name, prefix=prefix, scopes=scopes)
    except (ValueError, NotFound) as exc:
        raise _fail(str(exc)) from None
    _print_json(
        {
            "id": created.id,
            "key": secret,
            "account_id": created.account_id,
            "scopes": sorted(s.value for s in created.scopes),
        }
    )


@keys_app.command("list")
def keys_list(
    db: DbOption = DEFAULT_DB,
    account: Annotated[str | None, typer.Option(help="Account id; default: operator keys.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List keys (never their secrets). Ids are printed whole, at any terminal width."""
    keys = _open(db).list_keys(account)
    if as_json:
        _print_json(
            [
                {
                    "id": k.id,
                    "account_id": k.account_id,
                    "name": k.name,
                    "scopes": sorted(s.value for s in k.scopes),
                    "created_at": isoformat(k.created_at),
                    "revoked_at": isoformat(k.revoked_at) if k.revoked_at else None,
                }
                for k in keys
            ]
        )
        return
    table = Table(
        _id_column("id", [k.id for k in keys]),
        *map(_folded, ("account", "name", "scopes", "created", "revoked")),
    )
    for k in keys:
        table.add_row(
            k.id,
            k.account_id or "(operator)",
            k.name,
            ",".join(sorted(s.value for s in k.scopes)),
            isoformat(k.created_at),
            isoformat(k.revoked_at) if k.revoked_at else "",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, db: DbOption = DEFAULT_DB) -> None:
    """Revoke a key by its public id."""
    try:
        _open(db).revoke_key(key_id)
    except NotFound as exc:
        raise _fail(str(exc)) from None
    _print_json({"id": key_id, "revoked": True})


# -------------------------------------------------------------------- ingest


class _Interrupt:
    """Ctrl-C during an ingest: the batch under way finishes (stored or not, never half),
    then the command stops and says how far it got. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.asked = False

    def __enter__(self) -> _Interrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


# Blocks of a file `ingest` keeps waiting for their commit while it reads on: enough that the
# committer finds the next one queued when it finishes one, and a few to group in one commit.
IN_FLIGHT = 3


@app.command()
def ingest(
    file: Path,
    db: DbOption = DEFAULT_DB,
    batch: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="Events per transaction.")
    ] = MAX_BATCH,  # the fewer commits, the fewer times each index page goes to the WAL
    format: Annotated[str | None, typer.Option(help="ndjson or csv (default: by suffix).")] = None,
    meters: MetersOption = None,
) -> None:
    """Load events from an NDJSON or CSV file. Safe to run again after an interruption:
    events already stored are recognised by id and skipped. A record without an id gets one
    derived from the file name, its line and its content, so a rerun derives the same id.
    Account and key records (export --with-accounts) are created first when missing."""
    if not file.exists():
        raise _fail(f"{file} does not exist")
    kind = format or ("csv" if file.suffix.lower() == ".csv" else "ndjson")
    if kind not in ("csv", "ndjson"):
        raise _fail("--format: ndjson or csv")
    csv_records = CsvRecords(file) if kind == "csv" else None
    store = _open(db)
    ingestor = Ingestor(store, meters=_meters(meters))
    accepted = duplicates = count = last_line = 0
    created = {"accounts": 0, "keys": 0}
    pending: list[dict[str, Any]] = []
    lines: list[int] = []

    # SQLite stores blocks on its committer thread while this one reads and checks the next:
    # reading and checking are Python, the store's inserts, folds and fsync are C that runs
    # without the GIL, so they overlap. Up to IN_FLIGHT blocks wait for their commit, so the
    # committer always finds the next one queued; an interruption or a rejected block waits
    # for every one in flight, so the counts reported are exact.
    # Other stores write from this thread, as their clients expect.
    submit = store.submit if isinstance(store, SQLiteStore) else None
    in_flight: deque[tuple[list[Event], Future[AppendResult]]] = deque()

    def stored(result: AppendResult) -> None:
        nonlocal accepted, duplicates
        accepted += result.accepted
        duplicates += result.duplicates

    def refused(exc: BatchRejected) -> typer.Exit:
        # an account deleted meanwhile, say
        return _fail(
            f"a batch was refused and nothing of it stored: {exc.errors[0].message};"
            f" {accepted:,} events stored before it"
        )

    def settle(keep: int = 0) -> None:
        """Wait for the blocks in flight until ``keep`` are left."""
        first: BatchRejected | None = None
        while len(in_flight) > keep or (first is not None and in_flight):
            events, future = in_flight.popleft()
            try:
                with ingestor.writing(events) as write:
                    write.result = future.result()
            except BatchRejected as exc:
                first = first or exc
                continue
            stored(write.result)
        if first is not None:
            raise refused(first) from None

    def store_events(events: list[Event]) -> None:
        if submit is not None:
            settle(keep=IN_FLIGHT - 1)
            in_flight.append((events, submit(events)))
            return
        try:
            stored(ingestor.append(events))
        except BatchRejected as exc:
            raise refused(exc) from None

    def flush() -> None:
        if not pending:
            return
        try:
            events = ingestor.validate(pending)
        except BatchRejected as exc:
            settle()
            for e in exc.errors[:20]:
                column = csv_records.column_of(e.field) if csv_records else None
                err.print(f"{where(file, lines[e.index], column, e.field)}: {e.message}")
            more = len(exc.errors) - 20
            if more > 0:
                err.print(f"... and {more} more")
            raise _fail(
                f"the batch from line {lines[0]} was rejected and nothing of it stored;"
                f" {accepted:,} events stored before it. Fix the file and run again: stored"
                " events are skipped"
            ) from None
        store_events(events)
        pending.clear()
        lines.clear()

    def take(record: Record) -> None:
        """One record, checked and stored with the others of its chunk."""
        nonlocal count, last_line
        count += 1
        last_line = record.line
        data = record.data
        if isinstance(data, dict) and data.get("type") in ("account", "key"):
            flush()  # events before it go first, in file order
            settle()
            try:
                if load_record(store, data):
                    created[data["type"] + "s"] += 1
            except (ValueError, NotFound, Conflict) as exc:
                raise _fail(f"{where(file, record.line)}: {exc}") from None
            return
        if isinstance(data, dict) and "id" not in data:
            digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
            data["id"] = f"{file.name}:{count}:{digest[:16]}"
        pending.append(data)
        lines.append(record.line)
        if len(pending) >= batch:
            progress.advance(task, len(pending))
            flush()

    def take_block(block: list[tuple[int, bytes]]) -> None:
        """A block of NDJSON lines: decoded whole when every line is a clean event with
        its id (a file from ``export``), as the server decodes a request; else line by line,
        which derives missing ids, loads account and key records and names each problem."""
        nonlocal count, last_line
        # A block the compiled path refuses (an account or key record in it, a line to
        # name) goes line by line. (A block was sent line by line whenever "type" was in it,
        # which an event's dimension of that name is too: every conversations event.)
        events = ingestor.validate_clean(b"".join(line for _, line in block), True, None)
        if events is None:
            for number, line in block:
                take(ndjson_record(file, number, line))
                if interrupt.asked and not pending:
                    return
            return
        flush()  # records before the block go first, in file order
        count += len(block)
        last_line = block[-1][0]
        progress.advance(task, len(block))
        store_events(events)

    total = count_lines(file) - (1 if kind == "csv" else 0)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    with (
        _Interrupt() as interrupt,
        Progress(*columns, console=err, transient=True) as progress,
        collector_tuned(),
    ):
        task = progress.add_task(f"ingesting {file.name}", total=total)
        try:
            # An interruption stops between chunks, with every record taken stored.
            if csv_records is not None:
                for record in csv_records:
                    take(record)
                    if interrupt.asked and not pending:
                        break
                else:
                    flush()
                    interrupt.asked = False  # the file was read to its end
            else:
                for block in ndjson_blocks(file, batch):
                    take_block(block)
                    if interrupt.asked and not pending:
                        break
                else:
                    flush()
                    interrupt.asked = False
            settle()
        except RecordError as exc:
            settle()
            raise _fail(f"{exc}; {accepted:,} events stored before it") from None
        finally:
            settle()
    summary: dict[str, Any] = {"records": count, "accepted": accepted, "duplicates": duplicates}
    if any(created.values()):
        summary.update(created)
    if interrupt.asked:
        err.print(
            f"interrupted: {accepted:,} events stored ({duplicates:,} were already there),"
            f" up to line {last_line} of {file}. Run the same command again to resume:"
            " stored events are skipped."
        )
        _print_json({**summary, "interrupted": True})
        raise typer.Exit(130)
    _print_json(summary)


# --------------------------------------------------------------- query, export


@app.command()
def query(
    metric: str,
    account: str,
    db: DbOption = DEFAULT_DB,
    start: Annotated[str | None, typer.Option(help="RFC 3339, date or epoch ms.")] = None,
    end: Annotated[str | None, typer.Option(help="Exclusive end; default now.")] = None,
    granularity: Annotated[str, typer.Option(help="hour, day, month or total.")] = "day",
    tz: Annotated[str, typer.Option(help="IANA zone for bucket boundaries.")] = "UTC",
    group_by: Annotated[str, typer.Option(help="Comma-separated dimensions.")] = "",
    tags: Annotated[str, typer.Option(help="Comma-separated tags, all-of.")] = "",
    aggregation: Annotated[str | None, typer.Option(help="Override the meter.")] = None,
    meters: MetersOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a metric's usage for an account (and its subaccounts) as a table, or with
    --json in the shape GET /v1/query answers."""
    store = _open(db)
    try:
        zone = parse_zone(tz)
        end_at = parse_instant(end, zone) if end else datetime.now(UTC)
        start_at = parse_instant(start, zone) if start else end_at - timedelta(days=30)
        aggs = (parse_aggregation(aggregation)[0],) if aggregation else ()
        q = Query(
            accounts=tuple(store.descendants(account)),
            metric=metric,
            start=start_at,
            end=end_at,
            granularity=Granularity(granularity),
            tz=tz,
            aggregations=aggs,
            group_by=tuple(g for g in group_by.split(",") if g),
            tags=frozenset(t for t in tags.split(",") if t),
        )
        result = Engine(store, _meters(meters)).run(q)
    except (ValueError, NotFound, RawDropped) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        _print_json(_query_json(result))
        return
    value_column = Column(result.aggregations[0].value, justify="right")
    table = Table("bucket start", *q.group_by, value_column, title=metric)
    for b in result.buckets:
        for g in b.groups:
            table.add_row(isoformat(b.start), *(v or "" for _, v in g.group), _number(g.values[0]))
    console.print(table)
    console.print(f"total: {_number(result.total[0])}")


@app.command()
def export(
    db: DbOption = DEFAULT_DB,
    account: Annotated[str | None, typer.Option(help="Only this account (and below).")] = None,
    start: Annotated[str | None, typer.Option(help="RFC 3339, date or epoch ms.")] = None,
    end: Annotated[str | None, typer.Option(help="Exclusive end.")] = None,
    format: Annotated[str, typer.Option(help="ndjson or csv.")] = "ndjson",
    output: Annotated[Path | None, typer.Option(help="File to write (default stdout).")] = None,
    with_accounts: Annotated[
        bool,
        typer.Option(
            help="Begin with the accounts and their keys (secret hashes, so the keys keep"
            " working), so the file loads into an empty store with ingest. NDJSON only."
        ),
    ] = False,
) -> None:
    """Write raw events as NDJSON or CSV, in the form ingest reads back."""
    if with_accounts and format != "ndjson":
        raise _fail("--with-accounts: NDJSON only (use --format ndjson)")
    store = _open(db)
    try:
        accounts = store.descendants(account) if account else None
        start_ms = int(parse_instant(start).timestamp() * 1000) if start else None
        end_ms = int(parse_instant(end).timestamp() * 1000) if end else None
    except (ValueError, NotFound) as exc:
        raise _fail(str(exc)) from None
    if format not in ("ndjson", "csv"):
        raise _fail("--format: ndjson or csv")
    events = list(store.iter_events(accounts, start_ms, end_ms)) if format == "csv" else None
    handle = output.open("w", newline="") if output else sys.stdout
    try:
        if events is not None:
            dims = sorted({d for e in events for d in e.dimensions})
            writer = csv.writer(handle)
            base = ["id", "account", "key", "metric", "ts", "value", "billable", "tags"]
            writer.writerow(base + [f"dimensions.{d}" for d in dims])
            for e in events:
                writer.writerow(
                    [
                        e.id,
                        e.account_id,
                        e.key_id or "",
                        e.metric,
                        isoformat(from_ms(e.ts_ms)),
                        repr(e.value),
                        str(e.billable).lower(),
                        ",".join(sorted(e.tags)),
                    ]
                    + [e.dimensions.get(d, "") for d in dims]
                )
        else:
            if with_accounts:
                for item in account_records(store, set(accounts) if accounts else None):
                    handle.write(json.dumps(item) + "\n")
            for e in store.iter_events(accounts, start_ms, end_ms):
                record = {
                    "id": e.id,
                    "account": e.account_id,
                    "key": e.key_id,
                    "metric": e.metric,
                    "ts": isoformat(from_ms(e.ts_ms)),
                    "value": e.value,
                    "billable": e.billable,
                    "dimensions": dict(e.dimensions),
                    "tags": sorted(e.tags),
                }
                if record["key"] is None:
                    del record["key"]
                handle.write(json.dumps(record) + "\n")
    finally:
        if output:
            handle.close()


# ----------------------------------------------------------- backup, restore


@app.command()
def backup(dest: Path, db: DbOption = DEFAULT_DB) -> None:
    """Copy the whole database (events, accounts, keys) to DEST, consistently, while the
    server runs: the copy holds every batch stored before it began, whole."""
    if dest.exists():
        raise _fail(f"{dest} exists: name a new file")
    path = _sqlite_file(db, "backup")
    if not Path(path).exists():
        raise _fail(f"{path} does not exist")
    store = SQLiteStore(path)
    try:
        store.backup(dest)
    except sqlite3.Error as exc:
        raise _fail(f"backup to {dest} failed: {exc}") from None
    copy = SQLiteStore(dest)
    _print_json(
        {
            "backup": str(dest),
            "events": copy.count_events(),
            "accounts": len(copy.list_accounts()),
            "bytes": dest.stat().st_size,
        }
    )


@app.command("restore")
def restore_command(
    src: Path,
    db: DbOption = DEFAULT_DB,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the database if it exists.")
    ] = False,
) -> None:
    """Replace the database with the backup SRC (stop the server first). Refuses to
    overwrite an existing database without --force."""
    path = _sqlite_file(db, "restore")
    try:
        restore(src, Path(path), force=force)
    except RestoreRefused as exc:
        raise _fail(str(exc)) from None
    store = SQLiteStore(path)  # brings an older backup's rollups up to this version
    _print_json(
        {
            "restored": str(src),
            "events": store.count_events(),
            "accounts": len(store.list_accounts()),
        }
    )


@app.command()
def migrate(
    source: Annotated[str, typer.Option("--from", help="The store to copy from (a URL).")],
    target: Annotated[str, typer.Option("--to", help="The store to copy into (a URL).")],
    batch: Annotated[int, typer.Option(help="Events per append.", min=1, max=10_000)] = 10_000,
) -> None:
    """Copy accounts, keys and events from one store to another (any to any, e.g.
    sqlite:///usage.db to chdb:///usage.chdb). Safe to run again: what is there is skipped."""
    from usagemeter.migrate import copy_store

    if source == target:
        raise _fail("--from and --to name the same store")
    origin, destination = _open(source), _open(target)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"copying to {redact(target)}", total=origin.count_events())
        try:
            copied = copy_store(origin, destination, batch, lambda n: progress.advance(task, n))
        except ValueError as exc:
            raise _fail(str(exc)) from None
    _print_json(vars(copied))


# ------------------------------------------------------------------- limits

limits_app = typer.Typer(help="Set, list and delete usage limits.", no_args_is_help=True)
app.add_typer(limits_app, name="limits")


@limits_app.command("set")
def limits_set(
    account: str,
    metric: str,
    amount: float,
    db: DbOption = DEFAULT_DB,
    period: Annotated[str, typer.Option(help="billing_cycle, day, month or total.")] = (
        "billing_cycle"
    ),
    tz: Annotated[str, typer.Option(help="The zone periods are counted in.")] = "UTC",
    thresholds: Annotated[
        str, typer.Option(help="Comma-separated percents of AMOUNT (or values, --absolute).")
    ] = "100",
    absolute: Annotated[bool, typer.Option(help="Thresholds are usage values.")] = False,
    action: Annotated[str, typer.Option(help="alert, or block (the check says refuse).")] = (
        "alert"
    ),
    subaccounts: Annotated[bool, typer.Option(help="Count the subaccounts' usage too.")] = True,
) -> None:
    """Create the account's limit on METRIC, or replace it, and print it as JSON."""
    store = _open(db)
    try:
        store.get_account(account)
        values = [float(t) for t in thresholds.split(",") if t.strip()]
    except NotFound as exc:
        raise _fail(str(exc)) from None
    except ValueError:
        raise _fail(f"--thresholds: numbers separated by commas, not {thresholds!r}") from None
    try:
        old = store.get_limit(account, metric)
    except NotFound:
        old = None
    try:
        limit = build_limit(
            old.id if old else new_limit_id(),
            account,
            metric=metric,
            amount=amount,
            period=period,
            tz=tz,
            include_subaccounts=subaccounts,
            thresholds=values,
            threshold_unit="absolute" if absolute else "percent",
            action=action,
            created_ms=old.created_at_ms if old else wall_ms(),
        )
    except InvalidLimit as exc:
        raise _fail(str(exc)) from None
    if old is None:
        store.create_limit(limit)
    else:
        store.replace_limit(limit)
    _print_json(_limit_json(limit))


@limits_app.command("list")
def limits_list(
    db: DbOption = DEFAULT_DB,
    account: Annotated[str | None, typer.Option(help="One account's; default: all.")] = None,
) -> None:
    """Print the limits as JSON."""
    _print_json([_limit_json(limit) for limit in _open(db).list_limits(account)])


@limits_app.command("delete")
def limits_delete(account: str, metric: str, db: DbOption = DEFAULT_DB) -> None:
    """Delete the account's limit on METRIC."""
    try:
        _open(db).delete_limit(account, metric)
    except NotFound as exc:
        raise _fail(str(exc)) from None
    _print_json({"account": account, "metric": metric, "deleted": True})


# -------------------------------------------------------------------- config

config_app = typer.Typer(help="Check serve's configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(
    file: Annotated[
        str | None,
        typer.Argument(help="The TOML file (default: $USAGEMETER_CONFIG, if set)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Check a config file and print the settings serve would run with, and where each
    comes from (environment, config file or default). A store URL's password is masked."""
    command = typer.main.get_command(app)
    serve_command = command.commands["serve"]  # type: ignore[attr-defined]
    try:
        rows = config.effective(serve_command, file)
    except config.ConfigError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        _print_json({flag[2:]: {"value": value, "from": source} for flag, value, source in rows})
        return
    table = Table("option", _folded("value"), "from")
    for flag, value, source in rows:
        table.add_row(flag, "" if value is None else str(value), source)
    console.print(table)


# Corrections, retention and deletion register their commands on app and accounts_app.
from usagemeter import cli_corrections  # noqa: E402, F401


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
