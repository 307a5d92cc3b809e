"""A layer version as a file tree: entries and their serialized manifest (pure, no I/O).

A tree is a sorted tuple of entries, one per path, parents before children. Paths are
relative to the layer's root, '/'-separated, without a leading slash; the root directory
itself is the path "". Names are Python strings decoded with ``os.fsdecode`` (surrogate
escapes keep non-UTF-8 bytes), so every byte of a file name survives a round trip.

Regular file data lives in the chunk store; an entry lists its chunks (id, length). The
all-zero id stands for a chunk of zeros, which is never stored.

Changes against lower layers are expressed the way overlayfs expresses them on disk:
``WHITEOUT`` entries (a deleted path) and the ``opaque`` flag on a directory (it hides
whatever lower layers have under it). Imported layers are flat and carry neither; captured
layers and writable-layer versions do.

Serialized manifest (one object in the chunk store):

    offset  size  field
    0       4     magic b"LMFT"
    4       1     manifest version (1)
    5       3     reserved, zero
    8       4     number of entries n
    12      ...   n entries, in path order

    entry:  1 kind, 1 flags (bit 0: opaque), 2 path length, 4 mode (07777 bits), 4 uid,
            4 gid, 8 mtime (ns, signed), 8 size, 8 rdev, 2 target length,
            2 xattr count, 4 chunk count, then the path, the target (symlink target or
            hardlink's first path), the xattrs (1 name length, name, 4 value length,
            value) and the chunks (32 id, 4 length), all little-endian.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Final

from lamina.errors import CorruptObject
from lamina.store.codec import ID_SIZE, ZERO_ID

MAGIC: Final = b"LMFT"
VERSION: Final = 1
_HEAD = struct.Struct("<4sB3xI")
_ENTRY = struct.Struct("<BBHIIIqQQHHI")
_XNAME = struct.Struct("<B")
_XVAL = struct.Struct("<I")
_CHUNK = struct.Struct(f"<{ID_SIZE}sI")

FLAG_OPAQUE: Final = 1
# overlayfs's own attributes (trusted.overlay.*, or user.overlay.* on unprivileged
# mounts): they change how layers merge, so they are never taken from a source.
OVERLAY_XATTRS: Final = ("trusted.overlay.", "user.overlay.")
OPAQUE_XATTR: Final = "trusted.overlay.opaque"


class Kind(IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3
    HARDLINK = 4  # another name of the FILE entry at ``target``
    CHAR = 5
    BLOCK = 6
    FIFO = 7
    WHITEOUT = 8  # the path is deleted from the layers below


Chunk = tuple[bytes, int]  # (chunk id, length)
Xattrs = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    kind: Kind
    mode: int = 0o644  # permission bits, setuid/setgid/sticky included
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0  # bytes of file data (FILE only)
    target: str = ""  # SYMLINK target, or the path a HARDLINK shares its inode with
    rdev: int = 0  # CHAR and BLOCK devices
    xattrs: Xattrs = ()
    chunks: tuple[Chunk, ...] = ()
    opaque: bool = False  # DIR only: hides the layers below

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def parent(self) -> str:
        return self.path.rpartition("/")[0]

    def same_content(self, other: Entry) -> bool:
        """Equal in everything a reader sees except the mtime (and the path itself)."""
        return replace(self, path="", mtime_ns=0) == replace(other, path="", mtime_ns=0)


def is_under(path: str, top: str) -> bool:
    """``path`` is ``top`` or lies beneath it (the root "" contains everything)."""
    return not top or path == top or path.startswith(top + "/")


@dataclass(frozen=True, slots=True)
class Tree:
    """A layer version's entries in path order (see the module docstring)."""

    entries: tuple[Entry, ...] = ()
    _index: dict[str, Entry] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Tree:
        ordered = tuple(sorted(entries, key=lambda e: e.path))
        for a, b in itertools.pairwise(ordered):
            if a.path == b.path:
                raise ValueError(f"duplicate path {a.path!r} in tree")
        return cls(ordered)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def get(self, path: str) -> Entry | None:
        if not self._index and self.entries:
            self._index.update((e.path, e) for e in self.entries)
        return self._index.get(path)

    @property
    def data_bytes(self) -> int:
        return sum(e.size for e in self.entries if e.kind is Kind.FILE)

    def referenced(self) -> set[bytes]:
        """Every stored chunk id the tree's files use (zero chunks excluded)."""
        refs = {cid for e in self.entries for cid, _ in e.chunks}
        refs.discard(ZERO_ID)
        return refs

    def to_bytes(self) -> bytes:
        out = [_HEAD.pack(MAGIC, VERSION, len(self.entries))]
        for e in self.entries:
            path, target = os.fsencode(e.path), os.fsencode(e.target)
            out.append(
                _ENTRY.pack(
                    int(e.kind),
                    FLAG_OPAQUE if e.opaque else 0,
                    len(path),
                    e.mode,
                    e.uid,
                    e.gid,
                    e.mtime_ns,
                    e.size,
                    e.rdev,
                    len(target),
                    len(e.xattrs),
                    len(e.chunks),
                )
            )
            out += (path, target)
            for name, value in e.xattrs:
                raw = os.fsencode(name)
                out += (_XNAME.pack(len(raw)), raw, _XVAL.pack(len(value)), value)
            out += (_CHUNK.pack(cid, n) for cid, n in e.chunks)
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Tree:
        try:
            entries = tuple(_decode(data))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise CorruptObject(f"layer manifest: {exc}") from None
        for a, b in itertools.pairwise(entries):
            if a.path >= b.path:
                raise CorruptObject(f"layer manifest: {b.path!r} out of order")
        return cls(entries)


def _decode(data: bytes) -> Iterator[Entry]:
    if len(data) < _HEAD.size:
        raise CorruptObject("layer manifest: truncated header")
    magic, version, count = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise CorruptObject("layer manifest: bad magic or unsupported version")
    view, pos, fsdecode = memoryview(data), _HEAD.size, os.fsdecode
    for _ in range(count):
        kind, flags, plen, mode, uid, gid, mtime, size, rdev, tlen, nx, nc = _ENTRY.unpack_from(
            data, pos
        )
        pos += _ENTRY.size
        path = fsdecode(bytes(view[pos : pos + plen]))
        pos += plen
        target = fsdecode(bytes(view[pos : pos + tlen]))
        pos += tlen
        xattrs = []
        for _x in range(nx):
            (nlen,) = _XNAME.unpack_from(data, pos)
            name = fsdecode(bytes(view[pos + 1 : pos + 1 + nlen]))
            pos += 1 + nlen
            (vlen,) = _XVAL.unpack_from(data, pos)
            xattrs.append((name, bytes(view[pos + 4 : pos + 4 + vlen])))
            pos += 4 + vlen
        chunks = tuple(_CHUNK.iter_unpack(view[pos : pos + nc * _CHUNK.size]))
        pos += nc * _CHUNK.size
        yield Entry(
            path,
            Kind(kind),
            mode,
            uid,
            gid,
            mtime,
            size,
            target,
            rdev,
            tuple(xattrs),
            tuple((bytes(c), n) for c, n in chunks),
            bool(flags & FLAG_OPAQUE),
        )
    if pos != len(data):
        raise CorruptObject(f"layer manifest: {len(data) - pos} trailing bytes")
