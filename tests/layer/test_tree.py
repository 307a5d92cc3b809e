"""The layer manifest format: round trips, and refusal of anything malformed."""

from __future__ import annotations

import pytest

from lamina.errors import CorruptObject
from lamina.layer.tree import MAGIC, Entry, Kind, Tree, is_under
from lamina.store.codec import ZERO_ID


def _tree() -> Tree:
    return Tree.of(
        [
            Entry("", Kind.DIR, 0o755),
            Entry("etc", Kind.DIR, 0o755, opaque=True),
            Entry(
                "etc/passwd",
                Kind.FILE,
                0o4755,
                1000,
                1001,
                -5_000_000_001,  # before 1970: signed
                7,
                chunks=((b"\x01" * 32, 3), (ZERO_ID, 4)),
                xattrs=(("security.capability", b"\x00\x01\xff"), ("user.x", b"")),
            ),
            Entry("etc/hl", Kind.HARDLINK, target="etc/passwd"),
            Entry("lib", Kind.SYMLINK, 0o777, target="usr/lib"),
            Entry("dev/null", Kind.CHAR, 0o666, rdev=(1 << 8) | 3),
            Entry("gone", Kind.WHITEOUT, 0),
            Entry("caf\udce9", Kind.FIFO),  # a non-UTF-8 name byte survives
        ]
    )


def test_round_trip_keeps_every_field() -> None:
    tree = _tree()
    data = tree.to_bytes()
    assert data[:4] == MAGIC and data[4] == 1
    assert Tree.from_bytes(data) == tree
    assert Tree.from_bytes(data).get("etc/passwd") == tree.get("etc/passwd")


def test_sorted_parents_first_and_unique() -> None:
    tree = _tree()
    paths = [e.path for e in tree]
    assert paths == sorted(paths) and paths[0] == ""
    with pytest.raises(ValueError, match="duplicate"):
        Tree.of([Entry("a", Kind.DIR), Entry("a", Kind.FILE)])


def test_referenced_skips_zero_chunks_and_data_bytes_counts_files() -> None:
    tree = _tree()
    assert tree.referenced() == {b"\x01" * 32}
    assert tree.data_bytes == 7


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d[:3],
        lambda d: b"XXXX" + d[4:],
        lambda d: d[:4] + b"\x09" + d[5:],
        lambda d: d[:-1],
        lambda d: d + b"\x00",
    ],
)
def test_malformed_manifests_are_refused(mangle: object) -> None:
    data = _tree().to_bytes()
    with pytest.raises(CorruptObject):
        Tree.from_bytes(mangle(data))  # type: ignore[operator]


def test_same_content_ignores_mtime_only() -> None:
    a = Entry("x", Kind.FILE, 0o644, mtime_ns=1)
    assert a.same_content(Entry("y", Kind.FILE, 0o644, mtime_ns=2))
    assert not a.same_content(Entry("x", Kind.FILE, 0o600))


def test_is_under() -> None:
    assert is_under("home/a", "home") and is_under("home", "home") and is_under("x", "")
    assert not is_under("homer", "home")


def test_out_of_order_entries_are_refused() -> None:
    unsorted = Tree((Entry("b", Kind.DIR), Entry("a", Kind.DIR)))
    with pytest.raises(CorruptObject, match="out of order"):
        Tree.from_bytes(unsorted.to_bytes())
