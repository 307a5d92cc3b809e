"""Entry metadata merged field by field (pure): mode, owner, xattrs.

A user's ``chmod`` and an update's new content (or the reverse) are not a conflict: the
result has both. Only a field both sides changed, differently, needs the path's rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

from lamina.layer.tree import Entry, Xattrs


def content(e: Entry) -> tuple[object, ...]:
    return (e.kind, e.size, e.chunks, e.target, e.rdev)


@dataclass(frozen=True, slots=True)
class Meta:
    """What ``chmod``, ``chown`` and ``setfattr`` change."""

    mode: int
    owner: tuple[int, int]
    xattrs: Xattrs

    @classmethod
    def of(cls, e: Entry) -> Meta:
        return cls(e.mode, (e.uid, e.gid), e.xattrs)

    def apply(self, e: Entry) -> Entry:
        uid, gid = self.owner
        return replace(e, mode=self.mode, uid=uid, gid=gid, xattrs=self.xattrs)


_FIELDS: Final = ("mode", "owner", "xattrs")


def merge_meta(
    u: Entry, o: Entry | None, n: Entry, *, user_wins: bool
) -> tuple[Meta, list[str], list[str]]:
    """Mode, owner and xattrs merged field by field: (merged, fields both changed
    differently, fields taken from the new base)."""
    mu, mn = Meta.of(u), Meta.of(n)
    mo = Meta.of(o) if o is not None else None
    values: dict[str, object] = {}
    clashed: list[str] = []
    theirs: list[str] = []
    for name in _FIELDS:
        uv, nv = getattr(mu, name), getattr(mn, name)
        ov = getattr(mo, name) if mo is not None else None
        if uv == nv or (mo is not None and nv == ov):
            values[name] = uv
        elif mo is not None and uv == ov:
            values[name] = nv
            theirs.append(name)
        else:
            clashed.append(name)
            values[name] = uv if user_wins else nv
            if not user_wins:
                theirs.append(name)
    return Meta(**values), clashed, theirs  # type: ignore[arg-type]
