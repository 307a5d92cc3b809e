"""What a stack of read-only layers shows, and what changed between two stacks (pure).

A writable-layer version is a set of changes against the layers it was made on, so a
rebase compares the *views* of two stacks: the old bases and the new ones. A view is the
stack flattened the way overlayfs reads it: the first layer wins, a directory over a
directory merges (the upper one's metadata wins), whiteouts and opaque directories hide
what the layers below have there. Hard links are resolved to copies of the file they
name (their content is what a reader sees; which inode it is does not survive a merge).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from lamina.layer.tree import Entry, Kind, Tree


def resolve(e: Entry, lookup: Mapping[str, Entry] | Tree) -> Entry:
    """A hard link as a copy of the file it names (itself when the name is missing)."""
    if e.kind is not Kind.HARDLINK:
        return e
    first = lookup.get(e.target)
    if first is None or first.kind is not Kind.FILE:
        return e
    return replace(first, path=e.path)


def _ancestors(path: str) -> Iterator[str]:
    while path:
        path = path.rpartition("/")[0]
        yield path


class View:
    """Path -> entry of a flattened stack, with each directory's children on demand."""

    def __init__(self, entries: dict[str, Entry]) -> None:
        self.entries = entries
        self._children: dict[str, list[str]] | None = None
        self._sorted: list[str] | None = None

    def get(self, path: str) -> Entry | None:
        return self.entries.get(path)

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def children(self, path: str) -> list[str]:
        if self._children is None:
            index: dict[str, list[str]] = {}
            for p in self.entries:
                if p:
                    index.setdefault(p.rpartition("/")[0], []).append(p)
            self._children = index
        return self._children.get(path, [])

    def subtree(self, path: str) -> list[str]:
        """``path``'s descendants (not itself), sorted."""
        if self._sorted is None:
            self._sorted = sorted(self.entries)
        out = []
        prefix = path + "/" if path else ""
        i = bisect_left(self._sorted, prefix)
        while i < len(self._sorted) and self._sorted[i].startswith(prefix):
            if self._sorted[i]:
                out.append(self._sorted[i])
            i += 1
        return out


def flatten(layers: Sequence[Tree]) -> View:
    """The view of ``layers`` (first wins), without whiteouts or opaque flags."""
    if len(layers) == 1:  # the common case (one base): nothing to hide, nothing to merge
        only = layers[0]
        return View(
            {
                e.path: (replace(e, opaque=False) if e.opaque else resolve(e, only))
                for e in only
                if e.kind is not Kind.WHITEOUT
            }
        )
    result: dict[str, Entry] = {}
    for tree in reversed(layers):  # bottom first; each layer goes on top of what is there
        gone: set[str] = set()  # paths whose lower contents this layer hides
        for e in tree:
            if e.kind is Kind.WHITEOUT or e.opaque:
                gone.add(e.path)
            elif e.kind is not Kind.DIR:
                below = result.get(e.path)
                if below is not None and below.kind is Kind.DIR:
                    gone.add(e.path)
        if gone:
            # Everything beneath a hidden path goes (the hiding path itself is replaced below).
            for p in [p for p in result if p in gone or any(a in gone for a in _ancestors(p))]:
                del result[p]
        for e in tree:
            if e.kind is not Kind.WHITEOUT:
                seen = resolve(e, tree)
                result[e.path] = replace(seen, opaque=False) if seen.opaque else seen
    # A lower layer's entry beneath an upper layer's non-directory is hidden too.
    stray = [
        p
        for p in result
        if p and any((a in result and result[a].kind is not Kind.DIR) for a in _ancestors(p))
    ]
    for p in stray:
        del result[p]
    return View(result)


def same(a: Entry | None, b: Entry | None) -> bool:
    """Equal as a reader sees them (the mtime aside), or both absent."""
    if a is None or b is None:
        return a is b
    if a == b:
        return True
    # Cheap differences first: same_content copies both entries (8 us a pair, measured),
    # and most pairs compared here differ in their data.
    if a.kind is not b.kind or a.size != b.size or a.chunks != b.chunks or a.mode != b.mode:
        return False
    return a.same_content(b)


@dataclass
class BaseChange:
    """The old and the new view, and every path whose entry differs between them."""

    old: View
    new: View
    changed: set[str] = field(default_factory=set)
    _sorted: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, old: View, new: View) -> BaseChange:
        changed = {p for p, e in old.entries.items() if p and not same(e, new.get(p))} | {
            p for p in new.entries.keys() - old.entries.keys() if p
        }
        return cls(old, new, changed, sorted(changed))

    def changed_at_or_under(self, path: str) -> bool:
        if path in self.changed:
            return True
        prefix = path + "/"
        i = bisect_left(self._sorted, prefix)
        return i < len(self._sorted) and self._sorted[i].startswith(prefix)
