"""Small trees for rebase tests, written as {path: spec}, and what a stack of them shows.

Specs: a str or bytes is a file with that content; ``D`` a directory; ``W`` a whiteout;
``OPQ`` an opaque directory; ``L(target)`` a symlink; ``H(first)`` a hard link;
``F(data, mode=..., uid=...)`` a file with metadata; ``Dm(mode=...)`` a directory with it.
File data lives in ``BLOBS`` (chunk id -> bytes), which ``read`` reads like the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from hashlib import sha256
from typing import Any

from lamina.layer.tree import Entry, Kind, Tree
from lamina.rebase.merge import rebase_tree
from lamina.rebase.report import Outcome
from lamina.rebase.rules import RuleTable
from lamina.rebase.views import BaseChange, View, flatten

BLOBS: dict[bytes, bytes] = {}
NOW = 1_800_000_000_000_000_000


def chunk(data: bytes) -> tuple[bytes, int]:
    cid = sha256(data).digest()
    BLOBS[cid] = data
    return cid, len(data)


def read(e: Entry) -> bytes:
    return b"".join(BLOBS[cid] for cid, _ in e.chunks)


@dataclass(frozen=True)
class F:
    data: str | bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Dm:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    opaque: bool = False


@dataclass(frozen=True)
class L:
    target: str


@dataclass(frozen=True)
class H:
    first: str


D = Dm()
OPQ = Dm(opaque=True)
W = "\0whiteout"
Spec = Any


def entry(path: str, spec: Spec) -> Entry:
    if spec == W:
        return Entry(path, Kind.WHITEOUT, 0)
    if isinstance(spec, Dm):
        return Entry(path, Kind.DIR, spec.mode, spec.uid, spec.gid, opaque=spec.opaque)
    if isinstance(spec, L):
        return Entry(path, Kind.SYMLINK, 0o777, target=spec.target)
    if isinstance(spec, H):
        return Entry(path, Kind.HARDLINK, target=spec.first)
    f = spec if isinstance(spec, F) else F(spec)
    data = f.data.encode() if isinstance(f.data, str) else f.data
    return Entry(
        path,
        Kind.FILE,
        f.mode,
        f.uid,
        f.gid,
        size=len(data),
        xattrs=f.xattrs,
        chunks=(chunk(data),) if data else (),
    )


def tree(specs: Mapping[str, Spec], *, parents: View | None = None, root: bool = True) -> Tree:
    """Entries for ``specs`` plus missing parent directories (copied from ``parents``, the
    old base, for a user's tree: what overlayfs copies up)."""
    out = {p: entry(p, s) for p, s in specs.items()}
    for path in list(out):
        p = path
        while "/" in p:
            p = p.rpartition("/")[0]
            if p not in out:
                have = parents.get(p) if parents is not None else None
                out[p] = have if have is not None and have.kind is Kind.DIR else entry(p, D)
    if root:
        out[""] = Entry("", Kind.DIR, 0o755)
    return Tree.of(out.values())


@dataclass
class Case:
    old: Tree
    new: Tree
    user: Tree
    base: BaseChange

    @classmethod
    def of(cls, old: Mapping[str, Spec], new: Mapping[str, Spec], user: Mapping[str, Spec]) -> Case:
        o, n = tree(old), tree(new)
        vo, vn = flatten([o]), flatten([n])
        return cls(o, n, tree(user, parents=vo, root=False), BaseChange.of(vo, vn))

    def run(self, table: RuleTable | None = None, **kw: Any) -> tuple[Outcome, View]:
        out = rebase_tree(self.user, self.base, table or RuleTable(), read, now_ns=NOW, **kw)
        return out, shown(out, self.new)


def stored(out: Outcome) -> Tree:
    """The outcome's tree with merged files' data in ``BLOBS`` (what the store does)."""
    return Tree.of(
        replace(e, chunks=(chunk(out.blobs[e.path]),)) if e.path in out.blobs else e
        for e in out.tree
    )


def shown(out: Outcome, new: Tree) -> View:
    """What a mount of the result on the new base shows."""
    return flatten([stored(out), new])


def data(view: View, path: str) -> bytes | None:
    e = view.get(path)
    return read(e) if e is not None and e.kind is Kind.FILE else None
