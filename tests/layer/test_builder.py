"""Applying members the way tar and OCI image layers do (pure: no files involved)."""

from __future__ import annotations

import pytest

from lamina.errors import InvalidInput, UnsafeArchive
from lamina.layer.builder import Member, Permits, TreeBuilder
from lamina.layer.tree import Kind


def _file(name: str, ref: int, mode: int = 0o644) -> Member:
    return Member(name, Kind.FILE, mode, size=1, ref=(0, ref))


def _layer(b: TreeBuilder, *members: Member) -> None:
    b.begin_layer()
    for m in members:
        b.add(m)
    b.end_layer()


def test_parents_are_created_and_later_members_win() -> None:
    b = TreeBuilder()
    b.add(_file("./usr/bin/a", 1))
    b.add(Member("usr", Kind.DIR, 0o700, uid=5))
    b.add(_file("usr/bin/a", 2, 0o755))
    built = b.finish()
    assert [e.path for e in built.tree] == ["", "usr", "usr/bin", "usr/bin/a"]
    assert built.tree.get("usr").mode == 0o700 and built.tree.get("usr").uid == 5  # type: ignore[union-attr]
    assert built.refs == {"usr/bin/a": (0, 2)}
    assert built.tree.get("usr/bin/a").mode == 0o755  # type: ignore[union-attr]


def test_a_file_replacing_a_directory_removes_what_was_beneath() -> None:
    b = TreeBuilder()
    b.add(_file("d/x", 1))
    b.add(_file("d", 2))
    built = b.finish()
    assert built.tree.get("d/x") is None and built.refs == {"d": (0, 2)}


def test_oci_whiteouts_hide_lower_layers_only() -> None:
    b = TreeBuilder()
    _layer(b, _file("etc/a", 1), _file("etc/b", 2), _file("opt/x/1", 3), _file("keep", 4))
    # the whiteout comes after a same-layer file of the same directory: that file stays
    _layer(
        b,
        _file("opt/x/2", 5),
        Member("opt/x/.wh..wh..opq", Kind.FILE),
        Member("etc/.wh.a", Kind.FILE),
        Member("etc/.wh.missing", Kind.FILE),  # whiting out nothing is allowed
    )
    built = b.finish()
    paths = {e.path for e in built.tree}
    assert "etc/a" not in paths and "etc/b" in paths
    assert "opt/x/1" not in paths and "opt/x/2" in paths and "keep" in paths
    assert not any(".wh." in p for p in paths)
    assert not any(e.opaque or e.kind is Kind.WHITEOUT for e in built.tree)  # flat result


def test_whiteout_of_a_directory_removes_its_subtree() -> None:
    b = TreeBuilder()
    _layer(b, _file("a/b/c", 1), _file("a2", 2))
    _layer(b, Member(".wh.a", Kind.FILE))
    assert {e.path for e in b.finish().tree} == {"", "a2"}


def test_hard_links_follow_their_first_name() -> None:
    b = TreeBuilder()
    b.add(_file("a", 1))
    b.add(Member("b", Kind.HARDLINK, target="./a"))
    b.add(Member("c", Kind.HARDLINK, target="b"))  # a link to a link: to the first name
    b.add(_file("a", 9))  # replacing the first name hands its data to the next one
    built = b.finish()
    assert built.tree.get("b").kind is Kind.FILE and built.refs["b"] == (0, 1)  # type: ignore[union-attr]
    assert built.tree.get("c").target == "b"  # type: ignore[union-attr]
    assert built.refs["a"] == (0, 9)


def test_hard_link_to_a_symlink_becomes_a_copy() -> None:
    b = TreeBuilder()
    b.add(Member("s", Kind.SYMLINK, 0o777, target="x"))
    b.add(Member("t", Kind.HARDLINK, target="s"))
    assert b.finish().tree.get("t").kind is Kind.SYMLINK  # type: ignore[union-attr]


def test_hard_link_to_nothing_is_invalid() -> None:
    with pytest.raises(InvalidInput, match="no such member"):
        TreeBuilder().add(Member("b", Kind.HARDLINK, target="a"))


@pytest.mark.parametrize(
    "member",
    [
        Member("../evil", Kind.FILE),
        Member("/etc/passwd", Kind.FILE),
        Member("x", Kind.SYMLINK, target="../../etc/shadow"),
        Member("x", Kind.HARDLINK, target="/etc/shadow"),
        Member("null", Kind.CHAR, rdev=259),
        Member("sda", Kind.BLOCK, rdev=2048),
        Member("su", Kind.FILE, 0o4755),
        Member("wall", Kind.FILE, 0o2755),
    ],
)
def test_unsafe_members_are_refused(member: Member) -> None:
    builder = TreeBuilder()
    with pytest.raises(UnsafeArchive):  # at once (paths, links) or once all are seen
        builder.add(member)
        builder.finish()


def test_everything_a_policy_refuses_is_named_in_one_message() -> None:
    builder = TreeBuilder()
    for name in ("console", "null", "zero", "tty", "sda"):
        builder.add(Member(f"dev/{name}", Kind.CHAR, rdev=259))
    builder.add(Member("bin/su", Kind.FILE, 0o4755))
    builder.add(Member("bin/ping", Kind.FILE, 0o755, xattrs=(("security.capability", b"x"),)))
    builder.add(Member("etc/motd", Kind.FILE))
    with pytest.raises(UnsafeArchive) as refused:
        builder.finish()
    assert str(refused.value) == (
        "refused 5 device nodes ('dev/console', 'dev/null', 'dev/zero' and 2 more); "
        "1 setuid/setgid files ('bin/su'); 1 files with capabilities ('bin/ping'): "
        "allow with --allow-devices --allow-setuid"
    )


def test_devices_and_setuid_pass_when_allowed() -> None:
    b = TreeBuilder(Permits(allow_devices=True, allow_setuid=True))
    b.add(Member("null", Kind.CHAR, 0o666, rdev=259))
    b.add(_file("su", 1, 0o4755))
    b.add(Member("tmp", Kind.DIR, 0o1777))
    built = b.finish()
    assert built.tree.get("su").mode == 0o4755  # type: ignore[union-attr]
    assert built.tree.get("null").rdev == 259  # type: ignore[union-attr]


def test_setgid_directories_need_no_flag() -> None:
    b = TreeBuilder()
    b.add(Member("var/mail", Kind.DIR, 0o2775))
    assert b.finish().tree.get("var/mail").mode == 0o2775  # type: ignore[union-attr]


def test_member_beneath_a_symlink_is_refused() -> None:
    b = TreeBuilder()
    b.add(Member("etc", Kind.SYMLINK, 0o777, target="/etc"))
    with pytest.raises(UnsafeArchive, match="beneath symlink"):
        b.add(_file("etc/passwd", 1))


def test_member_beneath_a_file_is_invalid() -> None:
    b = TreeBuilder()
    b.add(_file("f", 1))
    with pytest.raises(InvalidInput, match="not a directory"):
        b.add(_file("f/x", 2))


def test_changes_keep_whiteouts_and_opaque_directories() -> None:
    b = TreeBuilder(Permits(allow_devices=True))
    b.add(Member("etc", Kind.DIR, 0o755, opaque=True))
    b.add(Member("bin/gone", Kind.WHITEOUT, 0))
    built = b.finish(root=False)
    assert built.tree.get("") is None
    assert built.tree.get("etc").opaque  # type: ignore[union-attr]
    assert built.tree.get("bin/gone").kind is Kind.WHITEOUT  # type: ignore[union-attr]
