"""Path safety for archive members and links (pure): what may enter a layer's tree.

A member name is normalized to the tree's form ("a/b", the root is "") or refused:
absolute names, ``..`` components, NUL bytes and over-long names are refused outright,
never "repaired", so that a hostile archive is rejected as a whole before anything is
written.

Links:
- a hard link must name another member of the same archive (normalized the same way);
- a relative symlink must not climb above the layer's root once resolved against its own
  directory (``a/b -> ../../etc`` escapes, ``a/b -> ../c`` does not), nor once the links
  it goes through are followed too, as the kernel follows them (``d/b -> ..`` is the
  root, so ``d/x -> b/..`` is the root's parent: ``check_link_chains``, over the whole
  tree);
- an absolute symlink is kept: a layer is a root filesystem, and its absolute links are
  resolved inside whatever root the layer is mounted as (``/etc/localtime ->
  /usr/share/zoneinfo/UTC`` in every distribution image). Lamina itself never follows a
  link while building or writing a tree, so a link cannot redirect a write.
- a member below a symlink (``link/x`` where ``link`` is a symlink) is refused by the tree
  builder: extracting it would write through the link.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from lamina.errors import UnsafeArchive

NAME_MAX: Final = 255
PATH_MAX: Final = 4095
# Links followed while resolving one path before giving up, as Linux does (ELOOP): a loop
# reaches nothing, so it is left alone.
MAX_HOPS: Final = 40


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


def check_link_chains(links: Mapping[str, str]) -> None:
    """Refuse a relative symlink of a tree (``links``: tree path -> target) that resolves
    above the root once the other links on its way are followed."""
    for path, target in links.items():
        if not target.startswith("/") and not _resolves_inside(links, path, target):
            raise UnsafeArchive(
                f"symlink {path!r} -> {target!r} escapes the layer through other links"
            )


def _resolves_inside(links: Mapping[str, str], path: str, target: str) -> bool:
    where = path.split("/")[:-1]  # the link's directory, as components
    todo = target.split("/")
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not where:
                return False
            where.pop()
            continue
        here = "/".join([*where, part])
        followed = links.get(here)
        if followed is None:
            where.append(part)
            continue
        hops += 1
        if followed.startswith("/") or hops > MAX_HOPS:
            return True  # resolved inside the root it is mounted as; or a loop
        todo = followed.split("/") + todo
    return True


def check_hardlink(path: str, target: str) -> str:
    """The normalized tree path a hard link points to; refused when it leaves the tree."""
    if target.startswith("/") or ".." in target.split("/"):
        raise UnsafeArchive(f"hard link {path!r} -> {target!r} points outside the archive")
    resolved = normalize(target, what=f"hard link {path!r} target")
    if not resolved:
        raise UnsafeArchive(f"hard link {path!r} points at the root directory")
    return resolved
