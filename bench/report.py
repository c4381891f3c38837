"""The results as a markdown table: machine, versions, figures, and the targets met or not."""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.questions import headline
from bench.results import OURS, Results, Row
from bench.timing import Timing

MB = 1024 * 1024


GAPS = Path(__file__).with_name("GAPS.md")


def fsync_ms(directory: Path, writes: int = 20) -> float:
    """Median time of an 8 kB write + fdatasync in `directory`: the floor under every
    durable acknowledgement, so under single-event ingest unless commits are grouped."""
    path = directory / "fsync.probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(writes):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 8192)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times) * 1000


def machine(directory: Path) -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    system = platform.platform()
    os_release = Path("/etc/os-release")
    if os_release.exists():
        for line in os_release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                system = f"{line.split('=', 1)[1].strip(chr(34))}, Linux {platform.release()}"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{mem / 1024**3:.0f} GiB",
        "system": system,
        "load": load_average(),
        "fsync": f"{fsync_ms(directory):.1f} ms",
    }


def load_average() -> str:
    """The 1-minute load average: other work on the machine skews every figure."""
    return Path("/proc/loadavg").read_text().split()[0]


def versions() -> dict[str, str]:
    out = {"Python": platform.python_version()}
    for name in ("httpx", "uvicorn", "numpy", "psycopg"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def figure(t: Timing | None) -> str:
    return f"{ms(t.median)} ({ms(t.cold)})" if t else "-"


def times(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x" if x >= 1 else f"{x:.2f}x"


def ratio(a: Timing | None, b: Timing | None) -> str:
    return times(a.median / b.median) if a and b and b.median else "-"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def targets(r: Results) -> list[tuple[str, str, str]]:
    """(target, measured, met) for each target of the issue that this run measured."""
    out = []
    main = next((p for p in r.scale if p.events == r.events), None)
    ours = main.timings.get(OURS) if main else None
    if ours:
        out.append(
            (
                "heavy 90-day daily report, HTTP warm < 10 ms",
                f"{ms(ours.median)} ms",
                _met(ours.median < 0.010),
            )
        )
        out.append(("same, cold < 30 ms", f"{ms(ours.cold)} ms", _met(ours.cold < 0.030)))
        pg, ch = main.timings.get("PostgreSQL"), main.timings.get("chDB")
        if pg:
            x = pg.median / ours.median
            out.append(("same, >= 25x faster than PostgreSQL", times(x), _met(x >= 25)))
        if ch:
            x = ch.median / ours.median
            out.append(("same, faster than chDB", times(x), _met(x > 1)))
    typical = [
        (row.question.name, row.timings[OURS])
        for row in r.rows
        if row.question.label == "typical" and OURS in row.timings
    ]
    typical += [(s.name, s.timing) for s in r.seeds if s.label == "typical" and s.timing]
    if typical:
        name, worst = max(typical, key=lambda item: item[1].median)
        out.append(
            (
                "typical account, any question or seed endpoint, HTTP warm < 5 ms",
                f"{ms(worst.median)} ms (slowest: {name})",
                _met(worst.median < 0.005),
            )
        )
    ing = r.ingest
    if ing.batch_seconds:
        out.append(
            (
                f"ingest, batches of {ing.batch_size}: >= 100,000 events/s",
                f"{ing.batch_rate:,.0f} events/s",
                _met(ing.batch_rate >= 100_000),
            )
        )
    if ing.single_seconds:
        out.append(
            (
                "ingest, single events: >= 3,000 requests/s",
                f"{ing.single_rate:,.0f} requests/s",
                _met(ing.single_rate >= 3_000),
            )
        )
    points = [p for p in r.scale if OURS in p.timings]
    for small, big in itertools.pairwise(points):
        x = big.timings[OURS].median / small.timings[OURS].median
        out.append(
            (
                f"heavy 90-day query at {big.events:,} <= 1.5x its time at {small.events:,}",
                f"{x:.2f}x",
                _met(x <= 1.5),
            )
        )
    if r.memory:
        peak = max(r.memory.values())
        out.append(("server peak RSS < 200 MB", f"{peak / MB:.0f} MB", _met(peak < 200 * MB)))
    return out


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _question_row(r: Results, row: Row) -> list[str]:
    ours = row.timings.get(OURS)
    peers = [p for p in r.systems if p != OURS]
    if row.mismatches:
        equal = "**NO: " + ", ".join(row.mismatches) + "**"
    else:
        equal = "yes" if peers else "-"
    return [
        row.question.label,
        row.question.name,
        str(row.cells),
        *[figure(row.timings.get(s)) for s in r.systems],
        *[ratio(row.timings.get(p), ours) for p in peers],
        equal,
    ]


def render(r: Results) -> str:
    peers = [p for p in r.systems if p != OURS]
    lines = [
        "# Benchmark results",
        "",
        f"Run {r.started:%Y-%m-%d %H:%M} UTC, `{r.command}`, {r.seconds / 60:.1f} min.",
        "",
        f"- Machine: {r.machine.get('cpu')}; {r.machine.get('memory')}; {r.machine.get('system')}",
        f"- Disk: 8 kB write + fdatasync {r.machine.get('fsync')} (median, in our database's "
        "directory): the floor under each durable acknowledgement",
        f"- Load average (1 min) before / after the run: {r.machine.get('load')} / "
        f"{r.machine.get('load_after')} (the machine's other work counts in every figure)",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in r.versions.items()),
        f"- Data: {r.events:,} events over 120 days to {r.anchor}, seed {r.seed}, "
        "1,000 accounts (Zipf), 5 keys each"
        + "".join(f"; {label} account {a} holds {n:,}" for label, (a, n) in r.accounts.items()),
        f"- Times in ms: median of {r.warm_runs} warm runs, the cold first run in brackets. "
        "Ours: an HTTP round trip to a real server (httpx, keep-alive), the server restarted "
        "before the first question; peers: the query's round trip (psycopg / chDB in process).",
        "",
    ]
    if r.failures:
        lines += ["## FAILED", "", *[f"- {f}" for f in r.failures], ""]
    lines += ["## Targets", ""]
    lines += _table(["target", "measured", ""], [list(t) for t in targets(r)])

    lines += ["## Questions", ""]
    lines += [
        "Cells: the non-empty (bucket, group) values in the answer. Speed-up: the peer's time "
        "over ours (above 1, ours is faster). Equal: every peer's answer is ours.",
        "",
    ]
    head = ["account", "question", "cells", *r.systems, *[f"speed-up vs {p}" for p in peers]]
    head.append("equal")
    lines += _table(head, [_question_row(r, row) for row in r.rows])

    lines += ["## Seed endpoints (default request, operator key, through HTTP)", ""]
    rows = [[s.label, s.name, figure(s.timing), s.note or "ok"] for s in r.seeds]
    lines += _table(["account", "endpoint", OURS, "note"], rows)

    ing = r.ingest
    lines += ["## Ingest (`POST /v1/events`, acknowledged once durable)", ""]
    rows = [
        [
            f"batches of {ing.batch_size}, {ing.batch_clients} clients",
            f"{ing.batch_events:,} events in {ing.batch_seconds:.1f} s",
            f"{ing.batch_rate:,.0f} events/s",
        ],
        [
            f"single events, {ing.single_clients} clients",
            f"{ing.single_requests:,} requests in {ing.single_seconds:.1f} s",
            f"{ing.single_rate:,.0f} requests/s",
        ],
    ]
    lines += _table(["mode", "sent", "rate"], rows)
    stored = (
        "equal to what was sent" if not ing.stored_wrong else "**DIFFERENT** from what was sent"
    )
    lines += [
        f"Stored counts checked after, by query: {ing.stored_checked:,} (account, metric) totals "
        f"and the single-event account's total ({ing.single_stored or 0:,.0f}): {stored}.",
        "",
    ]
    if r.loads:
        loads = ", ".join(f"{k} {v:.1f} s" for k, v in r.loads.items())
        lines += [f"Peers' load time for the same events, for reference: {loads}.", ""]

    lines += [f"## Scale: heavy account, {headline(r.anchor).name}", ""]
    rows = [
        [f"{p.events:,}", *[figure(p.timings.get(s)) for s in r.systems], f"{p.db_bytes / MB:,.0f}"]
        for p in r.scale
    ]
    lines += _table(["events stored", *r.systems, "our database, MB"], rows)

    lines += ["## Memory (server process peak RSS, VmHWM)", ""]
    rows = [[phase, f"{b / MB:.0f} MB"] for phase, b in r.memory.items()]
    lines += _table(["phase", "peak"], rows)
    if GAPS.exists():  # the written analysis of the targets missed, kept beside the bench
        lines += [GAPS.read_text().rstrip(), ""]
    return "\n".join(lines)
