"""Linux's mount API through ctypes: fsopen/fsconfig/fsmount/move_mount, umount2, mount.

Why not mount(8): one overlay mount with 20 layers is a 4 KiB option string for mount(2)
(it caps its data at a page), while ``fsconfig(..., "lowerdir+", path)`` takes one layer
per call (Linux 6.5+); and ``move_mount(..., MOVE_MOUNT_BENEATH)`` (Linux 6.5+) lets a new
overlay slide under the one mounted at a root, so replacing it is one atomic step for
path lookups (see ``lamina.layer.overlay``). Syscall numbers 428-433 are shared by every
architecture since Linux 5.1.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from lamina.errors import ToolError

_OPEN_TREE: Final = 428
_MOVE_MOUNT: Final = 429
_FSOPEN: Final = 430
_FSCONFIG: Final = 431
_FSMOUNT: Final = 432

OPEN_TREE_CLONE: Final = 0x1
OPEN_TREE_CLOEXEC: Final = os.O_CLOEXEC
FSOPEN_CLOEXEC: Final = 0x1
FSCONFIG_SET_FLAG: Final = 0
FSCONFIG_SET_STRING: Final = 1
FSCONFIG_CMD_CREATE: Final = 6
FSMOUNT_CLOEXEC: Final = 0x1
MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4
MOVE_MOUNT_BENEATH: Final = 0x200
AT_FDCWD: Final = -100
MNT_DETACH: Final = 0x2
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 1 << 18
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWPID: Final = 0x20000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def _context_messages(fd: int) -> str:
    """What the filesystem said about a failed fsconfig (``e overlayfs: ...`` lines)."""
    lines = []
    for _ in range(16):
        try:
            msg = os.read(fd, 1024)
        except OSError:
            break
        if not msg:
            break
        lines.append(msg.decode(errors="replace").strip())
    return "; ".join(lines)


@dataclass(frozen=True, slots=True)
class Param:
    key: str
    value: str | None = None  # None: a flag


def new_mount(fstype: str, params: Sequence[Param], *, attrs: int = 0) -> int:
    """A detached mount of a new filesystem instance; returns its mount fd (caller closes)."""
    fs = _check(_libc.syscall(_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC), f"fsopen {fstype}")
    try:
        for p in params:
            if p.value is None:
                rc = _libc.syscall(_FSCONFIG, fs, FSCONFIG_SET_FLAG, p.key.encode(), None, 0)
            else:
                value = os.fsencode(p.value)
                rc = _libc.syscall(_FSCONFIG, fs, FSCONFIG_SET_STRING, p.key.encode(), value, 0)
            if rc < 0:
                code = ctypes.get_errno()
                detail = _context_messages(fs) or os.strerror(code)
                raise OSError(code, f"{fstype} option {p.key}={p.value}: {detail}")
        if _libc.syscall(_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0) < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{fstype}: {_context_messages(fs) or os.strerror(code)}")
        return _check(_libc.syscall(_FSMOUNT, fs, FSMOUNT_CLOEXEC, attrs), f"fsmount {fstype}")
    finally:
        os.close(fs)


def clone_tree(path: Path) -> int:
    """A detached bind mount of ``path`` (not of what is mounted beneath it), as a mount
    fd to ``move_mount`` elsewhere (caller closes)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
    return _check(
        _libc.syscall(_OPEN_TREE, AT_FDCWD, os.fsencode(path), flags), f"open_tree {path}"
    )


def move_mount(mount_fd: int, target: Path, *, beneath: bool = False) -> None:
    flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_BENEATH if beneath else 0)
    rc = _libc.syscall(_MOVE_MOUNT, mount_fd, b"", AT_FDCWD, os.fsencode(target), flags)
    _check(rc, f"move_mount to {target}")


def umount(target: Path, *, lazy: bool = False) -> None:
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0), f"umount {target}")


def mount(source: str, target: Path, fstype: str | None, flags: int, data: str = "") -> None:
    """Plain mount(2), for bind mounts, tmpfs, proc and propagation changes."""
    rc = _libc.mount(
        source.encode(),
        os.fsencode(target),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(rc, f"mount {source} on {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def tool_error(exc: OSError, what: str) -> ToolError:
    """One line for a failed mount call, with a hint for the usual causes."""
    hint = ""
    if exc.errno == errno.EPERM:
        hint = " (mounting needs root)"
    elif exc.errno in (errno.ENOSYS, errno.EINVAL) and "move_mount" in str(exc):
        hint = " (needs Linux 6.5+)"
    return ToolError(f"{what}: {exc.strerror or exc}{hint}")
