"""A batch's columns as PostgreSQL binary arrays, each packed by a few calls into C.

Why: psycopg dumps a list as a binary array element by element in Python (a call, a
``struct.pack`` and a length per element): for the batch statement's eleven columns that
was about a third of the store's Python time per event (bench/pgprofile.py). The wire
format is simple and fixed (PostgreSQL's ``array_send``: a header, then each element as its
length and its bytes), so a column of numbers is one ``struct.pack`` of the lengths and
values interleaved, and a column of texts one ``bytes.join``.

Each packed array carries its type, so the statement's parameters keep one set of types
whatever the batch, and one prepared plan.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache

import psycopg
from psycopg.adapt import Dumper, PyFormat
from psycopg.pq import Format

_HEADER = struct.Struct(">iiiii")  # dimensions, has nulls, element type, length, lower bound
_EMPTY = struct.Struct(">iii")  # no dimension: dimensions 0, has nulls, element type
_LENGTH = struct.Struct(">i")


class PackedArray:
    """A one-dimensional array without NULLs in PostgreSQL's binary format; ``oid`` is the
    array type's."""

    __slots__ = ("data", "oid")

    def __init__(self, oid: int, data: bytes) -> None:
        self.oid = oid
        self.data = data


class _PackedArrayDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: PackedArray) -> bytes:
        return obj.data

    def get_key(self, obj: PackedArray, format: PyFormat) -> tuple[type, ...]:
        # One dumper per array type, so that each parameter is sent with its own type
        # (psycopg keys its dumpers by tuples of types: one stands for each array type).
        return (PackedArray, _KEYS[obj.oid])

    def upgrade(self, obj: PackedArray, format: PyFormat) -> Dumper:
        dumper = _PackedArrayDumper(PackedArray)
        dumper.oid = obj.oid
        return dumper


def register(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Let ``conn`` send PackedArray parameters (placeholders ``%b``)."""
    conn.adapters.register_dumper(PackedArray, _PackedArrayDumper)


# (struct code, element size, element type, array type) of the numeric columns.
_NUMBERS = {
    "int2": ("h", 2, 21, 1005),
    "int4": ("i", 4, 23, 1007),
    "int8": ("q", 8, 20, 1016),
    "float8": ("d", 8, 701, 1022),
}


_KEYS: dict[int, type] = {
    oid: type(f"ArrayOfType{oid}", (), {})
    for oid in (*(array_oid for *_, array_oid in _NUMBERS.values()), 1009, 1001)
}


@lru_cache(maxsize=64)
def _elements(code: str, count: int) -> struct.Struct:
    return struct.Struct(">" + ("i" + code) * count)


def _header(element_oid: int, count: int) -> bytes:
    if count == 0:
        return _EMPTY.pack(0, 0, element_oid)
    return _HEADER.pack(1, 0, element_oid, count, 1)


def numbers(kind: str, values: Sequence[int | float]) -> PackedArray:
    """``values`` as an array of ``kind`` (int2, int4, int8 or float8): each element is its
    size and its value, interleaved into one pack."""
    code, size, element_oid, array_oid = _NUMBERS[kind]
    count = len(values)
    fields: list[int | float] = [size] * (2 * count)
    fields[1::2] = values
    data = _header(element_oid, count) + _elements(code, count).pack(*fields)
    return PackedArray(array_oid, data)


def texts(values: Sequence[str]) -> PackedArray:
    """``values`` as text[], UTF-8."""
    encoded = [value.encode() for value in values]
    parts: list[bytes] = [b""] * (2 * len(encoded))
    parts[0::2] = map(_LENGTH.pack, map(len, encoded))
    parts[1::2] = encoded
    return PackedArray(1009, _header(25, len(encoded)) + b"".join(parts))


def fixed_bytes(values: Sequence[bytes], size: int) -> PackedArray:
    """``values``, each exactly ``size`` bytes long (digests), as bytea[]."""
    prefix = _LENGTH.pack(size)
    body = prefix + prefix.join(values) if values else b""
    if len(body) != (4 + size) * len(values):
        raise ValueError(f"every value must be {size} bytes long")
    return PackedArray(1001, _header(17, len(values)) + body)
