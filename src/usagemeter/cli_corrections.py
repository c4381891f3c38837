"""``usagemeter void``, ``amend``, ``voids``, ``accounts delete``, ``retain`` and ``compact``:
corrections, retention and deletion from the command line (the rules: corrections.py,
store/retention.py and the README's Operations section)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from usagemeter.cli import DEFAULT_DB, DbOption, _fail, _open, _print_json, accounts_app, app
from usagemeter.corrections import Amendment, RawDropped, VoidRecord, VoidSelector
from usagemeter.store.base import Conflict, NotFound
from usagemeter.store.retention import cutoff
from usagemeter.timewindows import parse_instant, to_ms

Reason = Annotated[str, typer.Option(help="Why (required; kept with the void).")]
AccountOption = Annotated[str, typer.Option(help="The account whose events these are.")]


def _void_json(record: VoidRecord) -> dict[str, Any]:
    # The web app's module, imported when a command prints it (see cli._query_json).
    from usagemeter.api.corrections import void_json

    return void_json(record)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _instant(name: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return to_ms(parse_instant(text))
    except ValueError as exc:
        raise _fail(f"--{name}: {exc}") from None


def _run_void(db: str, selector: VoidSelector, reason: str, amend: Amendment | None) -> None:
    if not reason.strip():
        raise _fail("--reason: say why (it is kept with the void)")
    try:
        record = _open(db).void_events(selector, reason, None, _now_ms(), amend)
    except (NotFound, Conflict, RawDropped, ValueError) as exc:
        raise _fail(str(exc)) from None
    _print_json(_void_json(record))


@app.command()
def void(
    account: AccountOption,
    reason: Reason,
    db: DbOption = DEFAULT_DB,
    id: Annotated[
        list[str] | None, typer.Option("--id", help="An event id (repeat for more).")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="Every event of this metric...")] = None,
    start: Annotated[str | None, typer.Option(help="...from this instant (RFC 3339).")] = None,
    end: Annotated[str | None, typer.Option(help="...to this one (exclusive).")] = None,
    key: Annotated[str | None, typer.Option(help="Only events of this key.")] = None,
    dimension: Annotated[
        list[str] | None, typer.Option(help="Only events with NAME=VALUE (repeatable).")
    ] = None,
) -> None:
    """Void events of one account, by id or by a filter, and print the void as JSON."""
    dims = []
    for item in dimension or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise _fail(f"--dimension {item!r}: give NAME=VALUE")
        dims.append((name, value))
    selector = VoidSelector(
        account_id=account,
        ids=tuple(id or ()),
        metric=metric,
        start_ms=_instant("start", start),
        end_ms=_instant("end", end),
        key_id=key,
        dimensions=tuple(sorted(dims)),
    )
    _run_void(db, selector, reason, None)


@app.command()
def amend(
    account: AccountOption,
    id: Annotated[str, typer.Option("--id", help="The event to amend.")],
    value: Annotated[float, typer.Option(help="The replacement's value.")],
    reason: Reason,
    db: DbOption = DEFAULT_DB,
    new_id: Annotated[
        str | None, typer.Option(help="The replacement's id (default: <id>~<void id>).")
    ] = None,
) -> None:
    """Void one event and store its replacement with a new value; print the void."""
    _run_void(db, VoidSelector(account, ids=(id,)), reason, Amendment(value, new_id))


@app.command()
def voids(
    db: DbOption = DEFAULT_DB,
    account: Annotated[str | None, typer.Option(help="Only this account's voids.")] = None,
) -> None:
    """List the voids, oldest first, as JSON."""
    _print_json([_void_json(r) for r in _open(db).list_voids(account)])


@accounts_app.command("delete")
def accounts_delete(
    account_id: str,
    db: DbOption = DEFAULT_DB,
    yes: Annotated[bool, typer.Option("--yes", help="Do it (there is no undo).")] = False,
) -> None:
    """Delete an account, its subaccounts and all their data (for privacy requests)."""
    store = _open(db)
    try:
        accounts = store.descendants(account_id)
    except NotFound as exc:
        raise _fail(str(exc)) from None
    if not yes:
        raise _fail(f"this deletes {accounts} and all their data for good: add --yes")
    _print_json({"deleted": accounts, "rows": store.delete_account(account_id)})


@app.command()
def retain(
    days: Annotated[int, typer.Option(min=1, help="Keep this many days of raw events.")],
    db: DbOption = DEFAULT_DB,
) -> None:
    """Drop raw events older than --days once, keeping their rollups and their ids."""
    before = cutoff(_now_ms(), days)
    _print_json({"dropped": _open(db).retain(before), "raw_kept_from_ms": before})


@app.command()
def compact(db: DbOption = DEFAULT_DB) -> None:
    """Give the space of dropped and deleted data back (VACUUM, partition drops, merges)."""
    _open(db).compact()
    _print_json({"compacted": True})
