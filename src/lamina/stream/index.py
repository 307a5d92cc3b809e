"""Which chunks of a streamed image the local cache holds (pure logic, no I/O).

The cache keeps the image's plaintext in a sparse data file, chunk ``i`` at byte
``i * chunk_size``; the index says which of those ranges hold verified data. On disk:

    offset  size  field
    0       4     magic b"LMSI"
    4       1     index version (1)
    5       3     reserved, zero
    8       8     image size in bytes
    16      4     chunk size in bytes
    20      4     number of chunks n
    24      32    manifest id of the image version
    56      ...   zero up to HEADER_SIZE (4096)
    4096    n     one byte per chunk: 1 = cached, anything else = not cached

Crash safety rests on one rule kept by the I/O layer: a mark reaches the index only after
the chunk's bytes were verified against its BLAKE3 id, written and ``fdatasync``ed. Marks
only ever go from 0 to 1, so any subset of them surviving a ``kill -9`` or a power loss
names good data; a chunk whose mark was lost is fetched again.

A chunk stored at several positions has one mark per position, and they reach the disk in
several writes: a crash may keep some and lose others. Such a chunk loads as not cached at
any of its positions, so it is fetched again and every one of its marks is written.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from lamina.errors import CorruptObject
from lamina.image import Manifest
from lamina.store import ZERO_ID

MAGIC: Final = b"LMSI"
VERSION: Final = 1
HEADER_SIZE: Final = 4096
CACHED: Final = 1
_HEAD = struct.Struct("<4sB3xQII32s")


def header(manifest: Manifest, manifest_id: bytes) -> bytes:
    head = _HEAD.pack(
        MAGIC, VERSION, manifest.size, manifest.chunk_size, manifest.count, manifest_id
    )
    return head.ljust(HEADER_SIZE, b"\0")


def check_header(data: bytes, manifest: Manifest, manifest_id: bytes) -> None:
    """Raise CorruptObject unless ``data`` starts with this manifest's index header."""
    if len(data) < _HEAD.size:
        raise CorruptObject("stream index: truncated header")
    magic, version, size, chunk_size, count, mid = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise CorruptObject("stream index: bad magic or unsupported version")
    if (size, chunk_size, count, mid) != (
        manifest.size,
        manifest.chunk_size,
        manifest.count,
        manifest_id,
    ):
        raise CorruptObject("stream index: belongs to another image version")


class CacheIndex:
    """In-memory view of the index: cached chunks, their byte counts, chunk positions."""

    def __init__(self, manifest: Manifest, marks: bytes | None = None) -> None:
        n = manifest.count
        self.manifest = manifest
        self.state = bytearray(n)
        # Positions of every stored chunk id: one fetch fills all of them (dedup).
        self.positions: dict[bytes, list[int]] = {}
        self.size = manifest.size
        self.data_bytes = 0  # bytes of non-zero chunks: what hydration must fetch
        self.cached_bytes = 0  # bytes readable locally (zero chunks included)
        self.cached_data_bytes = 0
        for i in range(n):
            cid = manifest.id_at(i)
            length = manifest.chunk_len(i)
            if cid == ZERO_ID:
                self.state[i] = CACHED
                self.cached_bytes += length
                continue
            self.positions.setdefault(cid, []).append(i)
            self.data_bytes += length
        self.missing_ids = 0
        for positions in self.positions.values():
            # Cached only if every position is marked: the marks of one chunk are written
            # in several runs, and a crash between them leaves some unmarked. Trusting the
            # marked ones would make ``add`` skip the chunk and its other places would
            # never be marked (reads there would refetch forever, never ``complete``).
            if marks is not None and all(i < len(marks) and marks[i] == CACHED for i in positions):
                for i in positions:
                    self.state[i] = CACHED
                    length = manifest.chunk_len(i)
                    self.cached_bytes += length
                    self.cached_data_bytes += length
            else:
                self.missing_ids += 1
        self._pending: list[int] = []

    # -- queries --------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.cached_bytes == self.size

    def is_cached(self, index: int) -> bool:
        return self.state[index] == CACHED

    def id_cached(self, cid: bytes) -> bool:
        # All positions of a chunk are cached or none (see __init__ and add).
        return self.state[self.positions[cid][0]] == CACHED

    def missing(self, offset: int, length: int) -> list[bytes]:
        """Chunk ids a read of ``[offset, offset+length)`` still needs, in order, once each."""
        cs = self.manifest.chunk_size
        first, last = offset // cs, (offset + max(length, 1) - 1) // cs
        out: list[bytes] = []
        for i in range(first, min(last, self.manifest.count - 1) + 1):
            if self.state[i] != CACHED:
                cid = self.manifest.id_at(i)
                if cid not in out:
                    out.append(cid)
        return out

    def all_cached(self, offset: int, length: int) -> bool:
        cs = self.manifest.chunk_size
        first, last = offset // cs, (offset + max(length, 1) - 1) // cs
        return self.state.find(0, first, last + 1) < 0  # memchr, not a Python loop

    # -- updates --------------------------------------------------------------------

    def add(self, cid: bytes) -> list[int]:
        """Chunk ``cid`` was written at all its positions: they read from the cache now.
        Returns the positions, which wait in ``pending`` until their marks are durable."""
        # Every position not yet cached, not just the first one's state: the chunk's bytes
        # were written at all of them, so none may stay unmarked.
        fresh = [i for i in self.positions[cid] if self.state[i] != CACHED]
        if not fresh:
            return []
        for i in fresh:
            self.state[i] = CACHED
            length = self.manifest.chunk_len(i)
            self.cached_bytes += length
            self.cached_data_bytes += length
        self.missing_ids -= 1
        self._pending += fresh
        return fresh

    def take_pending(self) -> list[int]:
        """Positions written since the last call (their marks still to be persisted)."""
        pending, self._pending = self._pending, []
        return pending


def mark_runs(positions: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted positions grouped into (first, count) runs: one pwrite per run of marks."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(positions)):
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs
