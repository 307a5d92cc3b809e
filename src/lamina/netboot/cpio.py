"""A cpio "newc" archive writer: the format the kernel unpacks an initramfs from.

Written here rather than run through cpio(1) so device nodes (/dev/console) need no
root, and the archive is the same bytes for the same input (inode numbers, owners and
times are fixed). Several archives one after the other (the demo's initramfs, then a
machine's credential) unpack into one tree, as the kernel reads them.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

_MAGIC = b"070701"


@dataclass(frozen=True, slots=True)
class Entry:
    path: str  # relative, no leading '/'
    mode: int  # full st_mode: type bits and permissions
    data: bytes = b""  # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)  # major, minor of a device node


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _record(ino: int, entry: Entry) -> bytes:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
    header = _MAGIC + b"".join(b"%08X" % f for f in fields)
    head = header + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def archive(entries: list[Entry]) -> bytes:
    """The newc archive of ``entries`` in order (parents before children), with trailer."""
    parts = [_record(ino, e) for ino, e in enumerate(entries, start=1)]
    parts.append(_record(0, Entry("TRAILER!!!", 0)))
    return b"".join(parts)
