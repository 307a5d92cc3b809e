"""Overlay mounts at a root: compose, switch live, find who uses them.

A composed root is one overlayfs mount: the prepared layer images as lower layers (first
wins), an upper directory for writes. Options pin what the upper directory may contain,
because a writable layer is made from it: ``redirect_dir=off`` and ``metacopy=off`` keep
it to plain files, whiteouts and opaque directories (a renamed lower directory is copied
instead of redirected), and ``index=off`` lets a second overlay share the upper directory
while the first one drains (live attach, below).

Live switch (attach/detach): overlayfs cannot change its layers once mounted, so a new
overlay (new layer list, same upper directory, its own work directory) is created
detached, moved *beneath* the current one at the root (``MOVE_MOUNT_BENEATH``), and the
current one is lazily detached. Path lookups go from the old view to the new one in one
step; nothing in the root is copied, so the cost does not depend on how many files the
layers hold. Processes that hold a file, a directory or their working directory inside
the old overlay keep using it (it lives on, detached, until the last of them lets go);
their writes land in the shared upper directory, which the new overlay shows too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lamina.layer import mountapi
from lamina.layer.mountapi import Param

OPTIONS = (Param("index", "off"), Param("redirect_dir", "off"), Param("metacopy", "off"))
_ESCAPE = re.compile(r"\\([0-7]{3})")
# Set once this kernel has refused "lowerdir+" (Linux < 6.8): every refusal is a line in
# the kernel's log, which a guest's admin would find at each login.
_REFUSED: set[str] = set()


@dataclass(frozen=True, slots=True)
class MountInfo:
    mount_id: int
    parent_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)


def mountinfo() -> list[MountInfo]:
    """This namespace's mounts, in mount order (a later mount covers an earlier one)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append(
                MountInfo(
                    int(fields[0]),
                    int(fields[1]),
                    _unescape(fields[4]),
                    fields[sep + 1],
                    _unescape(fields[sep + 2]),
                    _unescape(fields[sep + 3]) if len(fields) > sep + 3 else "",
                )
            )
    return out


def mounted_at(path: Path, mounts: Sequence[MountInfo] | None = None) -> MountInfo | None:
    """The visible mount whose mountpoint is exactly ``path`` (in ``mounts``, when the
    caller read the table already)."""
    want = os.path.realpath(path)
    found = [m for m in (mountinfo() if mounts is None else mounts) if m.mountpoint == want]
    return found[-1] if found else None


def submounts(path: Path) -> list[MountInfo]:
    """Mounts strictly beneath ``path``, deepest first (the order to unmount them)."""
    top = os.path.realpath(path).rstrip("/") + "/"
    under = [m for m in mountinfo() if m.mountpoint.startswith(top)]
    return sorted(under, key=lambda m: (m.mountpoint.count("/"), m.mount_id), reverse=True)


def compose(lowers: Sequence[Path], upper: Path, work: Path) -> int:
    """A detached overlay mount (its fd) of ``lowers`` (first wins) under ``upper``."""
    params = [Param("lowerdir+", str(p)) for p in lowers]
    params += [Param("upperdir", str(upper)), Param("workdir", str(work)), *OPTIONS]
    try:
        if "lowerdir+" in _REFUSED:
            return _compose_legacy(lowers, upper, work)
        try:
            return mountapi.new_mount("overlay", params)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _REFUSED.add("lowerdir+")
            return _compose_legacy(lowers, upper, work)
    except OSError as exc:
        raise mountapi.tool_error(exc, "overlay mount") from None


def _compose_legacy(lowers: Sequence[Path], upper: Path, work: Path) -> int:
    """Linux < 6.8 has no "lowerdir+", and fsconfig takes at most 255 bytes a value, so
    several layers do not fit in one "lowerdir" there: mount(2) takes a page of options.
    The overlay is mounted on a staging directory beside the work directory, cloned as a
    detached mount, and the staging mount dropped."""
    escaped = (str(p).replace("\\", "\\\\").replace(":", "\\:") for p in lowers)
    options = [f"lowerdir={':'.join(escaped)}", f"upperdir={upper}", f"workdir={work}"]
    options += [f"{o.key}={o.value}" for o in OPTIONS]
    stage = work.parent / f"{work.name}.stage"
    stage.mkdir(exist_ok=True)
    try:
        mountapi.mount("overlay", stage, "overlay", 0, ",".join(options))
        try:
            return mountapi.clone_tree(stage)
        finally:
            mountapi.umount(stage, lazy=True)
    finally:
        stage.rmdir()


def mount_new(fd: int, root: Path) -> None:
    try:
        mountapi.move_mount(fd, root)
    except OSError as exc:
        raise mountapi.tool_error(exc, f"mount on {root}") from None
    finally:
        os.close(fd)


def switch(fd: int, root: Path) -> None:
    """Replace the overlay at ``root`` with the detached one ``fd``, live."""
    try:
        try:
            mountapi.move_mount(fd, root, beneath=True)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            # No MOVE_MOUNT_BENEATH (Linux < 6.5, or a propagation setup it refuses):
            # detach first, then mount; lookups in between see the empty directory.
            mountapi.umount(root, lazy=True)
            mountapi.move_mount(fd, root)
            return
        mountapi.umount(root, lazy=True)  # the old overlay, now on top
    except OSError as exc:
        raise mountapi.tool_error(exc, f"switch {root}") from None
    finally:
        os.close(fd)


def device(root: Path) -> int:
    return os.stat(root).st_dev


def users(devices: set[int]) -> list[tuple[int, str]]:
    """(pid, command) of processes whose cwd, root, executable or an open file is on one of
    ``devices`` (overlay instances: the one at a root and the detached ones before it)."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        base = f"/proc/{name}"
        links = [f"{base}/cwd", f"{base}/root", f"{base}/exe"]
        with contextlib.suppress(OSError):
            links += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
        for link in links:
            try:
                if os.stat(link).st_dev in devices:
                    found.append((int(name), _comm(base)))
                    break
            except OSError:
                continue
    return found


def _comm(base: str) -> str:
    try:
        with open(f"{base}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"
