"""Policies, merges of a root's changes onto a writable layer, pruning, diffs, conflicts."""

from __future__ import annotations

import pytest

from lamina.errors import CorruptObject
from lamina.layer.changes import (
    WritablePolicy,
    diff,
    filter_policy,
    keeps,
    merge_changes,
    prune,
)
from lamina.layer.conflicts import Fingerprint, clashes, name_clashes, path_hash
from lamina.layer.tree import Entry, Kind, Tree


def _f(path: str, data: bytes = b"x", **kw: object) -> Entry:
    return Entry(
        path, Kind.FILE, chunks=((data.ljust(32, b"\0"), len(data)),), size=len(data), **kw
    )  # type: ignore[arg-type]


def _d(path: str, **kw: object) -> Entry:
    return Entry(path, Kind.DIR, 0o755, **kw)  # type: ignore[arg-type]


def _w(path: str) -> Entry:
    return Entry(path, Kind.WHITEOUT, 0)


@pytest.mark.parametrize(
    ("policy", "path", "kept"),
    [
        ("all", "usr/bin/x", True),
        ("all", "home/a/x", True),
        ("profile", "home/a/x", True),
        ("profile", "root/.bashrc", True),
        ("profile", "home", True),
        ("profile", "usr/bin/x", False),
        ("profile", "homer/x", False),
        ("apps", "usr/bin/x", True),
        ("apps", "home/a/x", False),
        ("apps", "root", False),
        ("all", "", False),
    ],
)
def test_policies(policy: str, path: str, kept: bool) -> None:
    assert keeps(WritablePolicy(policy), path) is kept


def test_filter_policy_reports_what_it_drops() -> None:
    tree = Tree.of([_d("home"), _f("home/x"), _d("usr"), _f("usr/y")])
    kept, dropped = filter_policy(tree, WritablePolicy.PROFILE)
    assert [e.path for e in kept] == ["home", "home/x"] and dropped == ["usr", "usr/y"]


def test_merge_new_changes_override_and_extend() -> None:
    before = Tree.of([_d("home"), _f("home/a", b"1"), _f("home/b", b"1")])
    changes = Tree.of([_d("home"), _f("home/a", b"2"), _f("home/c", b"3")])
    merged = merge_changes(before, changes)
    assert {e.path: e.chunks[0][0][:1] for e in merged if e.kind is Kind.FILE} == {
        "home/a": b"2",
        "home/b": b"1",
        "home/c": b"3",
    }


def test_merge_whiteout_removes_previous_subtree() -> None:
    before = Tree.of([_d("d"), _f("d/a"), _d("d/e"), _f("d/e/f"), _f("dz")])
    merged = merge_changes(before, Tree.of([_w("d")]))
    assert [e.path for e in merged] == ["d", "dz"] and merged.get("d").kind is Kind.WHITEOUT  # type: ignore[union-attr]


def test_merge_opaque_directory_drops_previous_children() -> None:
    before = Tree.of([_d("d"), _f("d/old")])
    merged = merge_changes(before, Tree.of([_d("d", opaque=True), _f("d/new")]))
    assert [e.path for e in merged] == ["d", "d/new"] and merged.get("d").opaque  # type: ignore[union-attr]


def test_merge_copied_up_directory_keeps_its_opaque_flag() -> None:
    before = Tree.of([_d("d", opaque=True), _f("d/a")])
    merged = merge_changes(before, Tree.of([_d("d", uid=7), _f("d/b")]))
    d = merged.get("d")
    assert d is not None and d.opaque and d.uid == 7 and merged.get("d/a") is not None


def test_merge_directory_over_a_previous_whiteout_becomes_opaque() -> None:
    # overlayfs makes a plain directory when the whiteout is in a lower layer; the next
    # version must still hide what the read-only layers have there.
    merged = merge_changes(Tree.of([_w("opt")]), Tree.of([_d("opt"), _f("opt/x")]))
    assert merged.get("opt").opaque and merged.get("opt").kind is Kind.DIR  # type: ignore[union-attr]


def test_merge_file_over_previous_whiteout_and_back() -> None:
    merged = merge_changes(Tree.of([_w("a")]), Tree.of([_f("a")]))
    assert merged.get("a").kind is Kind.FILE  # type: ignore[union-attr]
    again = merge_changes(merged, Tree.of([_w("a")]))
    assert again.get("a").kind is Kind.WHITEOUT  # type: ignore[union-attr]


def test_merge_onto_nothing_is_the_changes() -> None:
    changes = Tree.of([_d("home"), _f("home/a")])
    assert merge_changes(None, changes) == changes


def test_prune_drops_whiteouts_and_opaque_flags_that_hide_nothing() -> None:
    tree = Tree.of(
        [_w("tmpfile"), _w("etc/motd"), _d("etc"), _d("new", opaque=True), _d("usr", opaque=True)]
    )
    base = {"etc", "etc/motd", "usr"}
    pruned = prune(tree, base.__contains__)
    assert {e.path for e in pruned} == {"etc", "etc/motd", "new", "usr"}
    assert not pruned.get("new").opaque and pruned.get("usr").opaque  # type: ignore[union-attr]


def test_diff_reports_added_removed_changed_not_mtime() -> None:
    a = Tree.of([_d(""), _f("same"), _f("touched", mtime_ns=1), _f("edited", b"1"), _f("gone")])
    b = Tree.of([_d(""), _f("same"), _f("touched", mtime_ns=2), _f("edited", b"2"), _f("new")])
    d = diff(a, b)
    assert (d.added, d.removed, d.changed) == (["new"], ["gone"], ["edited"])


def test_fingerprint_round_trip_and_corruption() -> None:
    fp = Fingerprint.of(Tree.of([_d(""), _d("a"), _f("a/b")]))
    assert Fingerprint.from_bytes(fp.to_bytes()) == fp and len(fp) == 2  # no root
    assert fp.get(path_hash("a/b")) == fp.as_dict()[path_hash("a/b")] and fp.get(1) is None
    with pytest.raises(CorruptObject):
        Fingerprint.from_bytes(fp.to_bytes()[:-1])


def test_clashes_between_app_layers() -> None:
    one = Tree.of([_d("etc"), _f("etc/app.conf", b"1"), _f("opt/one"), _f("etc/shared", b"s")])
    two = Tree.of([_d("etc"), _f("etc/app.conf", b"2"), _f("opt/two"), _f("etc/shared", b"s")])
    three = Tree.of([_d("etc/app.conf")])  # a directory where the others have a file
    trees = [one, two, three]
    prints = [Fingerprint.of(t) for t in trees]
    found = name_clashes(clashes(prints), trees.__getitem__)
    assert found == [("etc/app.conf", 0, 1), ("etc/app.conf", 0, 2), ("etc/app.conf", 1, 2)]
    only_new = clashes(prints, only=2)
    assert {(c.first, c.second) for c in only_new} == {(0, 2), (1, 2)}


def test_identical_hard_links_do_not_clash() -> None:
    one = Tree.of([_f("a", b"1"), Entry("b", Kind.HARDLINK, target="a")])
    two = Tree.of([_f("c", b"1"), _f("b", b"1")])
    assert clashes([Fingerprint.of(one), Fingerprint.of(two)]) == []


def test_path_hash_is_stable() -> None:
    # fingerprints are kept on disk: the hash must not change between runs or versions
    assert path_hash("etc/passwd") == 8194581711084589317
    assert path_hash("etc/passwd") != path_hash("etc/passwe")


def test_small_against_large_layers_uses_lookups_and_agrees() -> None:
    large = Tree.of(
        [_f(f"opt/big/{i}", str(i).encode()) for i in range(2000)] + [_f("etc/x", b"L")]
    )
    small = Tree.of([_f("etc/x", b"S"), _f("opt/big/7", b"7"), _f("opt/small")])
    big_fp, small_fp = Fingerprint.of(large), Fingerprint.of(small)
    assert len(small_fp) * 16 < len(big_fp)  # the lookup path is the one taken
    found = clashes(
        [Fingerprint.from_bytes(small_fp.to_bytes()), Fingerprint.from_bytes(big_fp.to_bytes())]
    )
    assert [(c.path_hash, c.first, c.second) for c in found] == [(path_hash("etc/x"), 0, 1)]
