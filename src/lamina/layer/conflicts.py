"""Conflicts between app layers (pure): two layers providing one path with different content.

The bottom layer of a mount is its base (the OS); app layers overriding the base are how
apps install, so only app layers are compared with each other. Comparison goes through
fingerprints (path hash -> content hash, prepared once per layer version, format LMFP
below), so checking a 50,000-file layer costs set operations on integers, not a manifest
decode.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import blake3

from lamina.errors import CorruptObject, UsageError
from lamina.layer.tree import Entry, Kind, Tree

# Fingerprint file: magic, version, entry count, padding; then the sorted u64 path hashes
# and their u64 content hashes, little-endian.
FP_MAGIC: Final = b"LMFP"
FP_VERSION: Final = 1
# magic, version, entry count, padding to 16 bytes so the arrays that follow are aligned
_FP_HEAD = struct.Struct("<4sB3xI4x")
DIR_CONTENT: Final = 0  # the content hash of every directory: directories merge, never clash
# Below this size ratio a pair of layers is compared by looking the smaller one's paths up
# in the larger one's sorted array (bisect, no copy) instead of building two dicts: a
# 100-file layer against a 50,000-file one then costs 100 lookups, not 50,100 inserts.
_LOOKUP_RATIO: Final = 16


def path_hash(path: str) -> int:
    return int.from_bytes(
        blake3.blake3(path.encode("utf-8", "surrogateescape")).digest(8), "little"
    )


def _content_hash(e: Entry, tree: Tree) -> int:
    if e.kind is Kind.DIR:
        return DIR_CONTENT
    if e.kind is Kind.HARDLINK:
        first = tree.get(e.target)
        e = first if first is not None else e
    h = blake3.blake3(struct.pack("<BIIIQ", int(e.kind), e.mode, e.uid, e.gid, e.rdev))
    h.update(e.target.encode("utf-8", "surrogateescape") + b"\0")
    for name, value in e.xattrs:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0" + value + b"\0")
    for cid, n in e.chunks:
        h.update(cid + n.to_bytes(8, "little"))
    return int.from_bytes(h.digest(8), "little") | 1  # never DIR_CONTENT


class Fingerprint:
    """Path hash -> content hash for every entry of a tree, as two arrays sorted by path
    hash (read from disk without a copy, searched with bisect)."""

    def __init__(self, keys: Sequence[int], values: Sequence[int]) -> None:
        self.keys = keys
        self.values = values

    @classmethod
    def of(cls, tree: Tree) -> Fingerprint:
        pairs = sorted((path_hash(e.path), _content_hash(e, tree)) for e in tree if e.path)
        return cls(array("Q", (k for k, _ in pairs)), array("Q", (v for _, v in pairs)))

    def __len__(self) -> int:
        return len(self.keys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprint) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def get(self, key: int) -> int | None:
        i = bisect_left(self.keys, key)
        return self.values[i] if i < len(self.keys) and self.keys[i] == key else None

    def as_dict(self) -> dict[int, int]:
        return dict(zip(self.keys, self.values, strict=True))

    def to_bytes(self) -> bytes:
        n = len(self.keys)
        return b"".join(
            (
                _FP_HEAD.pack(FP_MAGIC, FP_VERSION, n),
                array("Q", self.keys).tobytes(),
                array("Q", self.values).tobytes(),
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Fingerprint:
        if len(data) < _FP_HEAD.size:
            raise CorruptObject("fingerprint: truncated")
        magic, version, n = _FP_HEAD.unpack_from(data)
        if magic != FP_MAGIC or version != FP_VERSION or len(data) != _FP_HEAD.size + 16 * n:
            raise CorruptObject("fingerprint: bad magic, version or length")
        view = memoryview(data)[_FP_HEAD.size :]
        return cls(view[: 8 * n].cast("Q"), view[8 * n :].cast("Q"))


@dataclass(frozen=True, slots=True)
class Clash:
    """Two app layers (indexes into the list given) disagree on a path (by its hash)."""

    path_hash: int
    first: int
    second: int


def _pair(a: Fingerprint, b: Fingerprint) -> Iterator[int]:
    """Path hashes ``a`` and ``b`` both have, with different content."""
    if len(a) * _LOOKUP_RATIO < len(b) or len(b) * _LOOKUP_RATIO < len(a):
        small, large = (a, b) if len(a) < len(b) else (b, a)
        for key, value in zip(small.keys, small.values, strict=True):
            other = large.get(key)
            if other is not None and other != value:
                yield key
        return
    da, db = a.as_dict(), b.as_dict()
    yield from (key for key in da.keys() & db.keys() if da[key] != db[key])


def clashes(apps: Sequence[Fingerprint], *, only: int | None = None) -> list[Clash]:
    """Paths two app layers provide with different content; with ``only``, just the pairs
    that include layer ``only`` (attaching one layer to a mount already checked)."""
    found = []
    for i, a in enumerate(apps):
        for j in range(i + 1, len(apps)):
            if only is None or only in (i, j):
                found += [Clash(key, i, j) for key in sorted(_pair(a, apps[j]))]
    return found


def name_clashes(
    found: Iterable[Clash], trees: Callable[[int], Tree]
) -> list[tuple[str, int, int]]:
    """(path, first, second) for each clash, reading path names from the layers' trees."""
    names: dict[int, dict[int, str]] = {}
    out = []
    for c in found:
        if c.first not in names:
            names[c.first] = {path_hash(e.path): e.path for e in trees(c.first)}
        out.append((names[c.first].get(c.path_hash, f"#{c.path_hash:016x}"), c.first, c.second))
    return sorted(out)


def check_order(stack: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Refuse a stack (first wins) in which a layer sits below one it was made on: an app
    captured on ``debbase`` placed under ``debbase`` would be hidden by the very files it
    changed. ``stack``: (NAME@V, the NAME@V refs it was made on) per layer."""
    above: dict[str, str] = {}
    for ref, bases in stack:
        for base in bases:
            over = above.get(base.rpartition("@")[0])
            if over is not None:
                raise UsageError(
                    f"{ref} was made on {base}, but {over} is placed above it: "
                    f"list {ref} before {over} (the first layer wins, the base goes last)"
                )
        above.setdefault(ref.rpartition("@")[0], ref)
