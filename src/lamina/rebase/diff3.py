"""Line-level 3-way merge (diff3), pure.

The user's file (``mine``) and the new base's (``theirs``) are each matched against the old
base's (``base``) with ``difflib.SequenceMatcher``; the stretches of the old base that both
sides kept unchanged are the *sync regions*, and between two of them each side either left
the old lines alone, made the same change, or changed them differently (an overlap).
Changes that touch adjacent lines with no unchanged line between them are one region, so
they overlap, as they do for GNU diff3 and git: the merge never guesses an order.

Works on bytes (lines end with ``\\n``, ``\\r\\n`` or ``\\r``), so any encoding survives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Final

# Above this size a file is not line-merged (configuration files are far smaller; a merge
# costs O(n * m) in the worst case).
TEXT_LIMIT: Final = 4 << 20


@dataclass(frozen=True, slots=True)
class Merged:
    data: bytes  # the clean merge; when ``clean`` is False, the user's file unchanged
    clean: bool
    overlaps: int  # regions both sides changed differently


def is_text(*datas: bytes) -> bool:
    """Whether every one looks like text: not too large and without NUL bytes."""
    return all(len(d) <= TEXT_LIMIT and b"\0" not in d for d in datas)


def _sync_regions(
    base: Sequence[bytes], mine: Sequence[bytes], theirs: Sequence[bytes]
) -> list[tuple[int, int, int, int, int, int]]:
    """(base start, base end, mine start, mine end, theirs start, theirs end) of each stretch
    both sides kept from the base, in order, ending with an empty one at the very end."""
    am = SequenceMatcher(None, base, mine, autojunk=False).get_matching_blocks()
    bm = SequenceMatcher(None, base, theirs, autojunk=False).get_matching_blocks()
    ia = ib = 0
    regions = []
    while ia < len(am) and ib < len(bm):
        abase, amatch, alen = am[ia]
        bbase, bmatch, blen = bm[ib]
        start, end = max(abase, bbase), min(abase + alen, bbase + blen)
        if end > start:
            n = end - start
            a0, b0 = amatch + start - abase, bmatch + start - bbase
            regions.append((start, end, a0, a0 + n, b0, b0 + n))
        if abase + alen < bbase + blen:
            ia += 1
        else:
            ib += 1
    nb, na, nt = len(base), len(mine), len(theirs)
    regions.append((nb, nb, na, na, nt, nt))
    return regions


def merge_lines(
    base: Sequence[bytes], mine: Sequence[bytes], theirs: Sequence[bytes]
) -> tuple[list[bytes], int]:
    """The merged lines and the number of overlapping regions (where, when there are any,
    the merged lines hold the user's side)."""
    out: list[bytes] = []
    overlaps = 0
    ob = om = ot = 0  # ends of the previous sync region
    for zb, ze, ma, me, ta, te in _sync_regions(base, mine, theirs):
        o_chunk, m_chunk, t_chunk = base[ob:zb], mine[om:ma], theirs[ot:ta]
        if t_chunk in (m_chunk, o_chunk):
            out += m_chunk  # the same change on both sides, or only the user changed
        elif m_chunk == o_chunk:
            out += t_chunk  # only the new base changed
        else:
            overlaps += 1
            out += m_chunk
        out += base[zb:ze]
        ob, om, ot = ze, me, te
    return out, overlaps


def merge3(base: bytes, mine: bytes, theirs: bytes) -> Merged:
    """Merge the changes from ``base`` to ``theirs`` into ``mine``."""
    if theirs in (mine, base):
        return Merged(mine, True, 0)
    if mine == base:
        return Merged(theirs, True, 0)
    lines, overlaps = merge_lines(
        base.splitlines(keepends=True),
        mine.splitlines(keepends=True),
        theirs.splitlines(keepends=True),
    )
    if overlaps:
        return Merged(mine, False, overlaps)
    return Merged(b"".join(lines), True, 0)
