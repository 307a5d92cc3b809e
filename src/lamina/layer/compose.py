"""How layers combine (pure): writable-layer policies and merges, conflicts, diffs.

- **Policies** (App Volumes' writable-volume templates) decide what of a session's changes a
  writable layer keeps: ``all`` every change, ``profile`` only users' home directories
  (``/home``, ``/root``), ``apps`` everything except those.
- **Merging** a session's upper directory (overlayfs' changes: files, whiteouts, opaque
  directories) into the writable layer's previous version gives its next version, still a
  set of file-level changes against the read-only layers it was made on. Whiteouts and
  opaque flags that hide nothing in those layers are pruned, so a file created in one
  session and deleted in a later one leaves no trace.
- **Conflicts**: two app layers providing one path with different content. The bottom layer
  of a mount is its base (the OS); app layers overriding the base are how apps install, so
  only app layers are compared with each other. Comparison goes through fingerprints
  (path hash -> content hash, prepared once per layer version), so checking a 50,000-file
  layer costs set operations on integers, not a manifest decode.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

import blake3

from lamina.errors import CorruptObject
from lamina.layer.tree import Entry, Kind, Tree, is_under


class WritablePolicy(StrEnum):
    ALL = "all"
    PROFILE = "profile"
    APPS = "apps"


HOME_DIRS: Final = ("home", "root")


def is_home(path: str) -> bool:
    return any(is_under(path, top) for top in HOME_DIRS)


def keeps(policy: WritablePolicy, path: str) -> bool:
    """Whether a writable layer under ``policy`` keeps a change at ``path``."""
    if not path:  # the root directory's own metadata is not a user change
        return False
    if policy is WritablePolicy.ALL:
        return True
    return is_home(path) == (policy is WritablePolicy.PROFILE)


def filter_policy(tree: Tree, policy: WritablePolicy) -> tuple[Tree, list[str]]:
    """The entries ``policy`` keeps, and the paths it drops."""
    kept: list[Entry] = []
    dropped: list[Entry] = []
    for e in tree:
        (kept if keeps(policy, e.path) else dropped).append(e)
    return Tree.of(kept), [e.path for e in dropped if e.path]


def merge_changes(previous: Tree | None, changes: Tree) -> Tree:
    """``previous`` with a session's ``changes`` (an overlayfs upper directory) on top."""
    result: dict[str, Entry] = {e.path: e for e in previous or ()}

    def drop(path: str, *, keep_top: bool) -> None:
        top = result.get(path)
        if top is not None and top.kind is Kind.DIR:  # only directories have anything beneath
            for p in [p for p in result if p != path and is_under(p, path)]:
                del result[p]
        if not keep_top:
            result.pop(path, None)

    for change in changes:  # parents first: a directory is settled before its children come
        e, before = change, result.get(change.path)
        if e.kind is Kind.DIR and not e.opaque and before is not None:
            if before.kind is Kind.DIR:
                e = replace(e, opaque=before.opaque)  # a copied-up directory keeps its flag
            else:
                # A directory made where the previous version had a whiteout or a file:
                # it must hide whatever the read-only layers have beneath it.
                drop(e.path, keep_top=False)
                e = replace(e, opaque=True)
        elif e.kind is Kind.DIR:
            drop(e.path, keep_top=True)
        elif before is not None:
            drop(e.path, keep_top=False)
        result[e.path] = e
    return Tree.of(result.values())


def prune(tree: Tree, in_bases: Callable[[str], bool]) -> Tree:
    """Drop whiteouts, and clear opaque flags, where the base layers have nothing to hide."""
    out = []
    for e in tree:
        if e.kind is Kind.WHITEOUT and not in_bases(e.path):
            continue
        out.append(replace(e, opaque=False) if e.opaque and not in_bases(e.path) else e)
    return Tree.of(out)


@dataclass(frozen=True, slots=True)
class Diff:
    added: list[str]
    removed: list[str]
    changed: list[str]


def diff(a: Tree, b: Tree) -> Diff:
    """Paths added, removed and changed (content, kind, mode, owner, xattrs) from a to b."""
    old = {e.path: e for e in a if e.path}  # the root directory is not a path of either
    new = {e.path: e for e in b if e.path}
    return Diff(
        added=sorted(new.keys() - old.keys()),
        removed=sorted(old.keys() - new.keys()),
        changed=sorted(p for p in old.keys() & new.keys() if not old[p].same_content(new[p])),
    )


# -- fingerprints -----------------------------------------------------------------------------

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
