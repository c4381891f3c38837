"""The ``usagemeter`` command: serve, accounts, keys, ingest, query, export, demo.

Every command but ``serve`` works on the database file directly (SQLite in WAL mode lets it
run beside a live server).
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from usagemeter import demo as demo_data
from usagemeter import logs
from usagemeter.auth import issue_key
from usagemeter.engine import Engine
from usagemeter.ingest import BatchRejected, Ingestor
from usagemeter.meters import MeterRegistry, parse_aggregation
from usagemeter.model import Account, Query, Scope
from usagemeter.store import open_store, redact
from usagemeter.store.base import Conflict, NotFound, Store
from usagemeter.timewindows import (
    BillingCycle,
    Granularity,
    from_ms,
    isoformat,
    parse_instant,
    parse_zone,
)

app = typer.Typer(help="Self-hosted usage metering and usage analytics.", no_args_is_help=True)
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
    # Closed at exit: a PostgreSQL store's pool then ends its connections cleanly.
    atexit.register(store.close)
    return store


def _meters(path: str | None) -> MeterRegistry:
    try:
        return MeterRegistry.from_file(path) if path else MeterRegistry()
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.command()
def serve(
    db: DbOption = DEFAULT_DB,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    demo: Annotated[bool, typer.Option(help="Load demo data first (idempotent).")] = False,
    meters: MetersOption = None,
    access_log: Annotated[
        bool, typer.Option(help="Log every request (secrets in URLs are masked).")
    ] = False,
) -> None:
    """Start the HTTP service: native API, seed endpoints, dashboard."""
    import uvicorn

    from usagemeter.api.app import create_app

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
    config = uvicorn.Config(
        create_app(store, _meters(meters)), host=host, port=port, access_log=access_log
    )
    server = uvicorn.Server(config)  # its logging is configured now, so the filter sticks
    logs.install()
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
def accounts_list(db: DbOption = DEFAULT_DB) -> None:
    """List every account."""
    table = Table("id", "name", "parent", "billing cycle")
    for a in _open(db).list_accounts():
        cycle = f"{a.billing_cycle.period} from {a.billing_cycle.anchor}" if a.billing_cycle else ""
        table.add_row(a.id, a.name, a.parent_id or "", cycle)
    console.print(table)


# ---------------------------------------------------------------------- keys


@keys_app.command("create")
def keys_create(
    db: DbOption = DEFAULT_DB,
    operator: Annotated[bool, typer.Option("--operator", help="An operator key.")] = False,
    account: Annotated[str | None, typer.Option(help="The account the key belongs to.")] = None,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    prefix: Annotated[str, typer.Option(help="Secret prefix, e.g. ak_.")] = "um_",
    scope: Annotated[list[str] | None, typer.Option(help="read and/or ingest.")] = None,
) -> None:
    """Create a key and print it as JSON. The secret (``key``) is shown only here."""
    if operator == (account is not None):
        raise _fail("give exactly one of --operator or --account ID")
    try:
        scopes = [Scope.OPERATOR] if operator else [Scope(s) for s in (scope or ["read"])]
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
) -> None:
    """List keys (never their secrets)."""
    table = Table("id", "account", "name", "scopes", "created", "revoked")
    for k in _open(db).list_keys(account):
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


def _csv_records(path: Path) -> Iterator[dict[str, Any]]:
    """CSV columns: id, account, key, metric, ts, value, billable, tags (comma-separated in
    one cell), and one ``dimensions.<name>`` column per dimension."""
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            record: dict[str, Any] = {}
            dims: dict[str, str] = {}
            for column, cell in row.items():
                if cell is None or cell == "":
                    continue
                if column.startswith("dimensions."):
                    dims[column.removeprefix("dimensions.")] = cell
                elif column == "value":
                    record["value"] = float(cell)
                elif column == "ts":
                    record["ts"] = int(cell) if cell.lstrip("-").isdigit() else cell
                elif column == "billable":
                    record["billable"] = cell.strip().lower() in ("true", "1", "yes")
                elif column == "tags":
                    record["tags"] = [t.strip() for t in cell.split(",") if t.strip()]
                else:
                    record[column] = cell
            if dims:
                record["dimensions"] = dims
            yield record


def _ndjson_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    raise _fail(f"{path}:{number}: not JSON: {exc}") from None


@app.command()
def ingest(
    file: Path,
    db: DbOption = DEFAULT_DB,
    batch: Annotated[int, typer.Option(help="Events per transaction.")] = 5000,
    format: Annotated[str | None, typer.Option(help="ndjson or csv (default: by suffix).")] = None,
) -> None:
    """Load events from an NDJSON or CSV file. Safe to run again after an interruption:
    events already stored are recognised by id and skipped. A record without an id gets one
    derived from the file name, its line and its content, so a rerun derives the same id."""
    if not file.exists():
        raise _fail(f"{file} does not exist")
    kind = format or ("csv" if file.suffix.lower() == ".csv" else "ndjson")
    if kind not in ("csv", "ndjson"):
        raise _fail("--format: ndjson or csv")
    records = _csv_records(file) if kind == "csv" else _ndjson_records(file)
    ingestor = Ingestor(_open(db))
    accepted = duplicates = line = 0
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal accepted, duplicates
        try:
            result = ingestor.ingest(pending)
        except BatchRejected as exc:
            first = line - len(pending) + 1
            for e in exc.errors[:20]:
                err.print(f"record {first + e.index}: {e.message}")
            raise _fail(
                f"batch starting at record {first} rejected; nothing of it stored"
            ) from None
        accepted += result.accepted
        duplicates += result.duplicates
        pending.clear()

    with file.open("rb") as handle:
        total = sum(1 for _ in handle) - (1 if kind == "csv" else 0)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"ingesting {file.name}", total=total)
        for record in records:
            line += 1
            if isinstance(record, dict) and "id" not in record:
                digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
                record["id"] = f"{file.name}:{line}:{digest[:16]}"
            pending.append(record)
            if len(pending) >= batch:
                progress.advance(task, len(pending))
                flush()
        if pending:
            flush()
    _print_json({"records": line, "accepted": accepted, "duplicates": duplicates})


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
) -> None:
    """Print a metric's usage for an account (and its subaccounts) as a table."""
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
    except (ValueError, NotFound) as exc:
        raise _fail(str(exc)) from None
    table = Table("bucket start", *q.group_by, result.aggregations[0].value, title=metric)
    for b in result.buckets:
        for g in b.groups:
            table.add_row(isoformat(b.start), *(v or "" for _, v in g.group), f"{g.values[0]:g}")
    console.print(table)
    console.print(f"total: {result.total[0]:g}")


@app.command()
def export(
    db: DbOption = DEFAULT_DB,
    account: Annotated[str | None, typer.Option(help="Only this account (and below).")] = None,
    start: Annotated[str | None, typer.Option(help="RFC 3339, date or epoch ms.")] = None,
    end: Annotated[str | None, typer.Option(help="Exclusive end.")] = None,
    format: Annotated[str, typer.Option(help="ndjson or csv.")] = "ndjson",
    output: Annotated[Path | None, typer.Option(help="File to write (default stdout).")] = None,
) -> None:
    """Write raw events as NDJSON or CSV, in the form ``ingest`` reads back."""
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


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
