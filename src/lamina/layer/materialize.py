"""Write a tree out as real files (``layer export``, and the input of ``mkfs.erofs``).

Everything a layer keeps is restored: kinds, modes (setuid included: chmod comes after
chown, which clears it), owners, xattrs (after chown too: it clears file capabilities), mtimes (directories last, once their children are
written), hard links, and holes for zero chunks. Whiteouts become 0/0 character devices
and opaque directories get ``trusted.overlay.opaque=y``: the exported tree is exactly what
overlayfs reads as a layer.

A manifest comes from the store, not from a trusted hand: every path is checked again and
must sit in a directory written before it, so no entry can be written through a link.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from lamina.errors import CorruptObject
from lamina.layer import paths
from lamina.layer.tree import OPAQUE_XATTR, Entry, Kind, Tree
from lamina.store import ZERO_ID, ChunkStore

Progress = Callable[[int], None]


def materialize(
    store: ChunkStore, tree: Tree, dest: Path, *, progress: Progress | None = None
) -> None:
    """Write ``tree`` into ``dest``, which must be an empty directory."""
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    root = os.fsencode(dest)
    dirs: list[tuple[bytes, Entry]] = []
    links: list[tuple[bytes, Entry]] = []
    written = {""}
    files: set[str] = set()
    for e in tree:
        if e.path and (paths.normalize(e.path) != e.path or e.parent not in written):
            raise CorruptObject(f"layer manifest: bad path {e.path!r}")
        full = root + b"/" + os.fsencode(e.path) if e.path else root
        if e.kind is Kind.DIR:
            if e.path:
                os.mkdir(full, 0o700)
            dirs.append((full, e))
            written.add(e.path)
            continue
        if e.kind is Kind.HARDLINK:
            # Linked once every file exists: a link may sort before the name it points to
            # ("a/b/c" -> "a/z"), the tree being in path order.
            links.append((full, e))
            continue
        _create(store, e, full, root)
        files.add(e.path)
        if progress is not None and e.size:
            progress(e.size)
        _metadata(full, e)
    for full, e in links:
        if e.target not in files:
            raise CorruptObject(f"layer manifest: hard link {e.path!r} to a missing file")
        _create(store, e, full, root)
    for full, e in reversed(dirs):
        _metadata(full, e)


def _create(store: ChunkStore, e: Entry, full: bytes, root: bytes) -> None:
    if e.kind is Kind.FILE:
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            _write_chunks(store, fd, e)
        finally:
            os.close(fd)
    elif e.kind is Kind.SYMLINK:
        os.symlink(os.fsencode(e.target), full)
    elif e.kind is Kind.HARDLINK:
        if paths.normalize(e.target) != e.target:
            raise CorruptObject(f"layer manifest: bad hard link {e.path!r}")
        os.link(root + b"/" + os.fsencode(e.target), full, follow_symlinks=False)
    elif e.kind is Kind.CHAR:
        os.mknod(full, stat.S_IFCHR | 0o600, e.rdev)
    elif e.kind is Kind.BLOCK:
        os.mknod(full, stat.S_IFBLK | 0o600, e.rdev)
    elif e.kind is Kind.FIFO:
        os.mkfifo(full, 0o600)
    elif e.kind is Kind.WHITEOUT:
        os.mknod(full, stat.S_IFCHR, 0)


def _write_chunks(store: ChunkStore, fd: int, e: Entry) -> None:
    pos = 0
    for cid, length in e.chunks:
        if cid == ZERO_ID:
            pos += length  # a hole; the final ftruncate sets the size
            continue
        data = store.get(cid)
        if len(data) != length:
            raise CorruptObject(f"chunk {cid.hex()} of {e.path!r} has the wrong length")
        os.pwrite(fd, data, pos)
        pos += length
    os.ftruncate(fd, pos)


def _metadata(full: bytes, e: Entry) -> None:
    """Owner, then mode, then xattrs: chown clears setuid bits and security.capability."""
    if os.geteuid() == 0:
        os.chown(full, e.uid, e.gid, follow_symlinks=False)
    else:  # an unprivileged export keeps the caller's ownership
        with contextlib.suppress(PermissionError):
            os.chown(full, e.uid, e.gid, follow_symlinks=False)
    if e.kind is not Kind.SYMLINK:
        os.chmod(full, e.mode)
    for name, value in e.xattrs:
        os.setxattr(full, name, value, follow_symlinks=False)
    if e.opaque:
        os.setxattr(full, OPAQUE_XATTR, b"y", follow_symlinks=False)
    os.utime(full, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
