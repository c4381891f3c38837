"""Event records read from NDJSON and CSV files, each with the line it starts on, so that
every problem names the file, the line and (in a CSV) the column to fix."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

# A CSV cell of ``billable``: anything else is an error rather than a quiet false.
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class RecordError(ValueError):
    """A record that cannot be read; the message names the file, line and column."""


@dataclass(frozen=True, slots=True)
class Record:
    line: int  # where the record starts in its file, from 1
    data: Any  # a JSON value: an event object, or what the validator will refuse


def where(path: Path, line: int, column: int | None = None, name: str | None = None) -> str:
    """``events.csv:3: column 6 (value)``: the place of a problem, as editors read it."""
    place = f"{path}:{line}"
    if column is not None:
        place += f": column {column}" + (f" ({name})" if name else "")
    return place


_DECODE = msgspec.json.Decoder().decode


def ndjson_blocks(path: Path, size: int) -> Iterator[list[tuple[int, bytes]]]:
    """The file's non-blank lines, undecoded, with their numbers, ``size`` to a block: a
    clean block is decoded whole by the ingestor's compiled path (``Ingestor.validate_json``),
    the others line by line (``ndjson_record``)."""
    block: list[tuple[int, bytes]] = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                block.append((number, line))
                if len(block) >= size:
                    yield block
                    block = []
    if block:
        yield block


def count_lines(path: Path) -> int:
    """The lines of a file as iterating over it counts them (a last one without its newline
    too), counted in C a megabyte at a time: a line at a time took a tenth of a second per
    200,000 lines before the first was stored."""
    lines, last = 0, b"\n"
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def ndjson_record(path: Path, number: int, line: bytes) -> Record:
    # msgspec reads lines in half json's time; a line it refuses goes to json, which reads
    # what JSON's Python dialect allows (NaN, a BOM) and else says what is wrong, as before.
    try:
        data = _DECODE(line)
    except msgspec.DecodeError:
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise RecordError(f"{where(path, number)}: not JSON: {exc}") from None
    return Record(number, data)


class CsvRecords:
    """CSV columns: id, account, key, metric, ts, value, billable, tags (comma-separated in
    one cell), and one ``dimensions.<name>`` column per dimension."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header: list[str] = []

    def column_of(self, field: str | None) -> int | None:
        """The 1-based column of an event field, when the file has it."""
        return self.header.index(field) + 1 if field in self.header else None

    def __iter__(self) -> Iterator[Record]:
        with self.path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            self.header = next(reader, [])
            start = reader.line_num + 1
            for row in reader:
                yield Record(start, self._record(row, start))
                start = reader.line_num + 1

    def _record(self, row: list[str], line: int) -> dict[str, Any]:
        if len(row) > len(self.header):
            raise RecordError(
                f"{where(self.path, line)}: {len(row)} cells, but the header names"
                f" {len(self.header)} columns"
            )
        record: dict[str, Any] = {}
        dims: dict[str, str] = {}
        for number, (column, cell) in enumerate(zip(self.header, row, strict=False), start=1):
            if cell == "":
                continue
            if column.startswith("dimensions."):
                dims[column.removeprefix("dimensions.")] = cell
            elif column == "value":
                try:
                    record["value"] = float(cell)
                except ValueError:
                    raise RecordError(
                        f"{where(self.path, line, number, column)}: {cell!r} is not a number"
                    ) from None
            elif column == "ts":
                record["ts"] = int(cell) if cell.lstrip("-").isdigit() else cell
            elif column == "billable":
                text = cell.strip().lower()
                if text not in _TRUE + _FALSE:
                    raise RecordError(
                        f"{where(self.path, line, number, column)}: {cell!r} is not true or false"
                    )
                record["billable"] = text in _TRUE
            elif column == "tags":
                record["tags"] = [t.strip() for t in cell.split(",") if t.strip()]
            else:
                record[column] = cell
        if dims:
            record["dimensions"] = dims
        return record
