"""Path safety for archive members and links (pure): what may enter a layer's tree.

A member name is normalized to the tree's form ("a/b", the root is "") or refused:
absolute names, ``..`` components, NUL bytes and over-long names are refused outright,
never "repaired", so that a hostile archive is rejected as a whole before anything is
written.

Links:
- a hard link must name another member of the same archive (normalized the same way);
- a relative symlink must not climb above the layer's root once resolved against its own
  directory (``a/b -> ../../etc`` escapes, ``a/b -> ../c`` does not);
- an absolute symlink is kept: a layer is a root filesystem, and its absolute links are
  resolved inside whatever root the layer is mounted as (``/etc/localtime ->
  /usr/share/zoneinfo/UTC`` in every distribution image). Lamina itself never follows a
  link while building or writing a tree, so a link cannot redirect a write.
- a member below a symlink (``link/x`` where ``link`` is a symlink) is refused by the tree
  builder: extracting it would write through the link.
"""

from __future__ import annotations

from typing import Final

from lamina.errors import UnsafeArchive

NAME_MAX: Final = 255
PATH_MAX: Final = 4095


def normalize(name: str, *, what: str = "member") -> str:
    """The tree path of an archive member name; raises UnsafeArchive when it escapes."""
    if "\0" in name:
        raise UnsafeArchive(f"{what} {name!r}: NUL byte in name")
    if name.startswith("/"):
        raise UnsafeArchive(f"{what} {name!r}: absolute path")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UnsafeArchive(f"{what} {name!r}: '..' in path")
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise UnsafeArchive(f"{what} {name[:80]!r}...: name longer than {NAME_MAX} bytes")
        parts.append(part)
    path = "/".join(parts)
    if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise UnsafeArchive(f"{what} {name[:80]!r}...: path longer than {PATH_MAX} bytes")
    return path


def check_symlink(path: str, target: str) -> None:
    """Refuse a relative symlink at ``path`` whose target climbs above the root."""
    if not target:
        raise UnsafeArchive(f"symlink {path!r}: empty target")
    if "\0" in target:
        raise UnsafeArchive(f"symlink {path!r}: NUL byte in target")
    if target.startswith("/"):
        return
    depth = path.count("/")  # directories between the root and the link
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UnsafeArchive(f"symlink {path!r} -> {target!r} escapes the layer")
        else:
            depth += 1


def check_hardlink(path: str, target: str) -> str:
    """The normalized tree path a hard link points to; refused when it leaves the tree."""
    if target.startswith("/") or ".." in target.split("/"):
        raise UnsafeArchive(f"hard link {path!r} -> {target!r} points outside the archive")
    resolved = normalize(target, what=f"hard link {path!r} target")
    if not resolved:
        raise UnsafeArchive(f"hard link {path!r} points at the root directory")
    return resolved
