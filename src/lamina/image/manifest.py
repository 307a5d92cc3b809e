"""Image manifests: a block image as a table of fixed-size chunk ids (pure data, no I/O).

Serialized form (stored in the chunk store like any other object):

    offset  size    field
    0       4       magic b"LMIM"
    4       1       manifest version (1)
    5       3       reserved, zero
    8       8       logical size in bytes
    16      4       chunk size in bytes
    20      4       number of chunks n = ceil(size / chunk size)
    24      32*n    chunk ids; the all-zero id marks a chunk of zeros (never stored)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from lamina.errors import CorruptObject
from lamina.store.codec import ID_SIZE, ZERO_ID

MAGIC: Final = b"LMIM"
VERSION: Final = 1
_HEAD = struct.Struct("<4sB3xQII")


@dataclass(frozen=True, slots=True)
class Manifest:
    size: int
    chunk_size: int
    table: bytes  # n * 32 bytes of chunk ids

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.size < 0:
            raise ValueError("bad manifest geometry")
        if len(self.table) != self.count * ID_SIZE:
            raise ValueError(
                f"manifest table has {len(self.table)} bytes, expected {self.count * ID_SIZE}"
            )

    @classmethod
    def empty(cls, size: int, chunk_size: int) -> Manifest:
        n = -(-size // chunk_size)
        return cls(size, chunk_size, ZERO_ID * n)

    @property
    def count(self) -> int:
        return -(-self.size // self.chunk_size)

    def id_at(self, index: int) -> bytes:
        return self.table[index * ID_SIZE : (index + 1) * ID_SIZE]

    def ids(self) -> Iterator[bytes]:
        for i in range(self.count):
            yield self.table[i * ID_SIZE : (i + 1) * ID_SIZE]

    def chunk_len(self, index: int) -> int:
        """Length of chunk ``index`` (the last one may be short)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def referenced(self) -> set[bytes]:
        """Every stored chunk id (the zero id excluded)."""
        refs = set(self.ids())
        refs.discard(ZERO_ID)
        return refs

    def spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(chunk index, offset in chunk, length) covering ``[offset, offset+length)``."""
        end = offset + length
        cs = self.chunk_size
        while offset < end:
            index, within = divmod(offset, cs)
            take = min(cs - within, end - offset)
            yield index, within, take
            offset += take

    def replace(self, changes: Mapping[int, bytes]) -> Manifest:
        """A new manifest with some chunk ids replaced."""
        table = bytearray(self.table)
        for index, cid in changes.items():
            if not 0 <= index < self.count or len(cid) != ID_SIZE:
                raise ValueError(f"bad manifest change at chunk {index}")
            table[index * ID_SIZE : (index + 1) * ID_SIZE] = cid
        return Manifest(self.size, self.chunk_size, bytes(table))

    def to_bytes(self) -> bytes:
        return _HEAD.pack(MAGIC, VERSION, self.size, self.chunk_size, self.count) + self.table

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        if len(data) < _HEAD.size:
            raise CorruptObject("manifest: truncated header")
        magic, version, size, chunk_size, count = _HEAD.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise CorruptObject("manifest: bad magic or unsupported version")
        if (
            chunk_size == 0
            or count != -(-size // chunk_size)
            or len(data) != _HEAD.size + count * ID_SIZE
        ):
            raise CorruptObject("manifest: inconsistent geometry")
        return cls(size, chunk_size, bytes(data[_HEAD.size :]))
