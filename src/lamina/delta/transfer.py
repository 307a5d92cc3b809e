"""Delta blobs: a machine delta's blocks as one self-checking byte stream (pure, but for
``map_file``).

A streamed machine's local writes travel to the manager (``lamina stream sync``) and a
stateful machine's delta travels back (first start) in this form:

    offset  size  field
    0       4     magic b"LMSD"
    4       1     blob version (1)
    5       3     reserved, zero
    8       4     block size (4096)
    12      4     number of runs r
    16      8     image size in bytes
    24      32    manifest id of the image version the delta applies to
    56      8     reserved, zero
    64      ...   r runs, each a 16-byte head (u32 first block, u32 block count, u8 kind
                  1 = data / 2 = zeros, 7 reserved) followed, for data, by count * 4096
                  bytes (the image's last block padded with zeros)
    end-32  32    BLAKE3-256 of every byte before it

Applying a blob writes each run into the target delta; doing it twice gives the same
delta, which is what makes an interrupted sync safe to retry.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import blake3

from lamina.errors import CorruptObject

MAGIC: Final = b"LMSD"
VERSION: Final = 1
BLOCK: Final = 4096
DATA: Final = 1
ZEROS: Final = 2
_HEAD = struct.Struct("<4sB3xIIQ32s8x")
_RUN = struct.Struct("<IIB7x")
TRAILER: Final = 32


@dataclass(frozen=True, slots=True)
class Run:
    first: int
    count: int
    kind: int  # DATA or ZEROS
    data: bytes | memoryview | None = None  # count * BLOCK bytes for DATA


@dataclass(frozen=True, slots=True)
class Blob:
    size: int
    base_id: bytes
    runs: list[Run]

    @property
    def blocks(self) -> int:
        return sum(r.count for r in self.runs)


class Encoder:
    """Builds a blob piece by piece (the caller writes the pieces out as they come)."""

    def __init__(self, size: int, base_id: bytes, run_count: int) -> None:
        self._hash = blake3.blake3()
        self.head = self._feed(_HEAD.pack(MAGIC, VERSION, BLOCK, run_count, size, base_id))
        self.blocks = -(-size // BLOCK)
        self._left = run_count

    def _feed(self, data: bytes | memoryview) -> bytes | memoryview:
        self._hash.update(data)
        return data

    def run(self, run: Run) -> list[bytes | memoryview]:
        if self._left <= 0:
            raise ValueError("more runs than announced")
        if run.count <= 0 or run.first + run.count > self.blocks or run.kind not in (DATA, ZEROS):
            raise ValueError(f"bad run {run.first}+{run.count}")
        self._left -= 1
        parts = [self._feed(_RUN.pack(run.first, run.count, run.kind))]
        if run.kind == DATA:
            if run.data is None or len(run.data) != run.count * BLOCK:
                raise ValueError("a data run needs count * 4096 bytes")
            parts.append(self._feed(run.data))
        return parts

    def trailer(self) -> bytes:
        if self._left:
            raise ValueError(f"{self._left} announced runs missing")
        return self._hash.digest()


def encode(size: int, base_id: bytes, runs: list[Run]) -> bytes:
    enc = Encoder(size, base_id, len(runs))
    out = [enc.head]
    for run in runs:
        out += enc.run(run)
    out.append(enc.trailer())
    return b"".join(out)


def max_size(image_size: int) -> int:
    """The largest blob a delta of an image this size makes (every block in a run of its
    own, with data): what an upload of one may hold at most."""
    blocks = -(-image_size // BLOCK)
    return _HEAD.size + blocks * (_RUN.size + BLOCK) + TRAILER


def digest(data: bytes | memoryview) -> bytes:
    """The hash a whole blob ends with (checked before an upload is applied)."""
    return bytes(data[-TRAILER:]) if len(data) >= TRAILER else b""


def decode(data: bytes | memoryview) -> Blob:
    """Parse and check a blob; data runs are views into ``data`` (no copies)."""
    view = memoryview(data)
    if len(view) < _HEAD.size + TRAILER:
        raise CorruptObject("delta blob: truncated")
    magic, version, block, count, size, base_id = _HEAD.unpack_from(view)
    if magic != MAGIC or version != VERSION or block != BLOCK:
        raise CorruptObject("delta blob: bad magic or unsupported version")
    body = view[:-TRAILER]
    if blake3.blake3(body).digest() != bytes(view[-TRAILER:]):
        raise CorruptObject("delta blob: checksum mismatch (incomplete or damaged)")
    blocks = -(-size // BLOCK)
    pos = _HEAD.size
    runs: list[Run] = []
    for _ in range(count):
        if pos + _RUN.size > len(body):
            raise CorruptObject("delta blob: truncated run")
        first, n, kind = _RUN.unpack_from(body, pos)
        pos += _RUN.size
        if n == 0 or first + n > blocks or kind not in (DATA, ZEROS):
            raise CorruptObject(f"delta blob: bad run {first}+{n}")
        chunk: memoryview | None = None
        if kind == DATA:
            end = pos + n * BLOCK
            if end > len(body):
                raise CorruptObject("delta blob: truncated data")
            chunk = body[pos:end]
            pos = end
        runs.append(Run(first, n, kind, chunk))
    if pos != len(body):
        raise CorruptObject("delta blob: trailing bytes")
    return Blob(size, bytes(base_id), runs)


def map_file(path: Path) -> memoryview:
    """A blob file as a read-only view (mapped, not read: blobs may be large). The map
    closes once the last view of it is gone, so views may outlive errors safely."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def split(runs: Iterable[Run], max_blocks: int) -> Iterator[Run]:
    """Runs cut to at most ``max_blocks`` blocks (bounded memory per piece)."""
    for run in runs:
        for start in range(0, run.count, max_blocks):
            n = min(max_blocks, run.count - start)
            data = None
            if run.data is not None:
                data = memoryview(run.data)[start * BLOCK : (start + n) * BLOCK]
            yield Run(run.first + start, n, run.kind, data)
