"""The rows of each row group of a parquet file, read from the file's footer.

polars reads a slice of a parquet file by decoding every row group the slice touches, whole. A file whose row
groups are larger than semid's batches was therefore decoded once per batch: pandas and pyarrow write up to
1,048,576 rows in one group, and a million items in one group took 16 decodes, 5x the time of a file in
batch-sized groups. Knowing the groups, a reader takes each large group in one read and cuts it up in memory.
polars does not expose them, so this module reads the one field it needs from the footer's Thrift compact
encoding (FileMetaData.row_groups[i].num_rows) and skips everything else.
"""
from __future__ import annotations

import os
from typing import Iterator

_MAGIC = b"PAR1"
# Thrift compact protocol type codes (the low nibble of a field header, or a list's element type)
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
_ROW_GROUPS = 4  # FileMetaData field: list<RowGroup>
_NUM_ROWS = 3  # RowGroup field: i64


class _Compact:
    """A cursor over Thrift compact-protocol bytes that can read varints and skip any value."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        value = self.data[self.pos]  # IndexError past the end: a footer that is not what it claims
        self.pos += 1
        return value

    def varint(self) -> int:
        shift = value = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def fields(self) -> Iterator[tuple[int, int]]:
        """(field id, type) of each field of the struct that starts here, up to its stop byte. The caller reads
        or skips each field's value before asking for the next."""
        field = 0
        while True:
            header = self.byte()
            kind = header & 0x0F
            if kind == 0:
                return
            field = field + (header >> 4) if header >> 4 else self.zigzag()
            yield field, kind

    def list_header(self) -> tuple[int, int]:
        header = self.byte()
        size = header >> 4
        return (self.varint() if size == 15 else size), header & 0x0F

    def skip(self, kind: int, *, element: bool = False) -> None:
        if kind in (_TRUE, _FALSE):
            self.pos += 1 if element else 0  # a struct field's boolean is its type; a list's takes a byte
        elif kind == _BYTE:
            self.pos += 1
        elif kind in (_I16, _I32, _I64):
            self.varint()
        elif kind == _DOUBLE:
            self.pos += 8
        elif kind == _BINARY:
            length = self.varint()  # read first: `self.pos += self.varint()` would add to the position before it
            self.pos += length
        elif kind in (_LIST, _SET):
            size, inner = self.list_header()
            for _ in range(size):
                self.skip(inner, element=True)
        elif kind == _MAP:
            size = self.varint()
            types = self.byte() if size else 0
            for _ in range(size):
                self.skip(types >> 4, element=True)
                self.skip(types & 0x0F, element=True)
        elif kind == _STRUCT:
            for _, inner in self.fields():
                self.skip(inner)
        else:
            raise ValueError(f"unknown Thrift compact type {kind}")


def row_group_rows(path: str | os.PathLike) -> list[int] | None:
    """Rows of each row group of a parquet file, in file order; None where the footer cannot be read so (an
    encrypted footer, a damaged file): readers then fall back to plain slices."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 12:
                return None
            f.seek(size - 8)
            tail = f.read(8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] != _MAGIC or length > size - 12:
                return None
            f.seek(size - 8 - length)
            footer = _Compact(f.read(length))
        for field, kind in footer.fields():
            if field == _ROW_GROUPS and kind == _LIST:
                count, _ = footer.list_header()
                return [_num_rows(footer) for _ in range(count)]
            footer.skip(kind)
    except (OSError, IndexError, ValueError):
        return None
    return None


def _num_rows(footer: _Compact) -> int:
    rows = None
    for field, kind in footer.fields():
        if field == _NUM_ROWS and kind == _I64:
            rows = footer.zigzag()
        else:
            footer.skip(kind)
    if rows is None or rows < 0:
        raise ValueError("a row group without its number of rows")
    return rows
