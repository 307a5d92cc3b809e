"""Live attach and detach: add a layer to, or drop one from, a mounted root.

overlayfs cannot add or drop a layer of a mounted instance, so attach and detach build a
second overlay (the new layer list, the *same* upper directory, a new work directory),
move it beneath the mounted one at the root (``move_mount(MOVE_MOUNT_BENEATH)``, Linux 6.5)
and lazily detach the old one. Nothing is copied: the cost is two mount calls, whatever
the number of files (measured by ``bench/attach.py``).

- New path lookups through the root see the new layer set at once.
- A process with an open file, an open directory or its working directory inside the root
  keeps using the old overlay, which stays alive, detached, until the last such reference
  is gone. Files it had open stay open (a detached layer's files stay readable); relative
  lookups from its old working directory see the *old* layer set (a detached layer's files
  are still there, an attached one's are not) until it changes directory through the
  root's path again (``cd /same/path`` is enough).
- No write is lost: both overlays write into the one upper directory. Files the process
  already has open for writing were copied up when opened; files it creates go to the
  upper directory, where the new overlay finds them.
- Limits: (1) when the *same* lower-layer file is first modified through the new overlay
  and later through the old one (or the reverse), the second copy-up finds the upper file
  already there and fails with EEXIST instead of overwriting it: the late writer gets an
  error, the first write is kept. (2) a name the new overlay looked up and found missing
  may stay cached as missing if the old overlay creates it afterwards, until the dentry
  cache drops it; the file is in the upper directory and is kept at umount. (3) the kernel
  logs once that the upper directory is shared ("upperdir is in-use"). (4) ``umount``
  waits for every generation: it refuses while any process is inside any of them.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from lamina.errors import Conflict, NotFound, UsageError
from lamina.home import Home
from lamina.layer import overlay
from lamina.layer.conflicts import check_order
from lamina.layer.records import LayerRecords, MountRecord, VersionInfo
from lamina.layer.roots import (
    HOST,
    Layout,
    Mounted,
    conflicts,
    mounted,
    prepare_version,
    real_root,
    refuse,
    root_lock,
)
from lamina.names import parse_ref


def attach(
    home: Home, records: LayerRecords, root: Path | str, layer: str, *, strict: bool = False
) -> Mounted:
    """Add ``layer`` on top of the read-only layers at ``root``, live."""
    started = time.monotonic()
    path = real_root(root)
    with root_lock(home, path):
        rec, mounts = _live_record(home, records, path)
        [new] = records.versions([layer])
        same = [v.ref for v in rec.layers if v.layer_id == new.layer_id]
        if same:
            raise Conflict(f"{same[0]} is already attached to {path}")
        stack = [new, *rec.layers]
        bases = records.base_refs([v.id for v in stack])
        check_order([(v.ref, b) for v, b in zip(stack, bases, strict=True)])
        timings: dict[str, float] = {}
        lowers = [prepare_version(home, v, timings, mounts) for v in _with_top(rec, stack)]
        found = conflicts(home, stack, 0)
        refuse(home, records, found, strict)
        rec = _switch(home, records, path, rec, stack, lowers)
    return mounted(path, rec, found, timings, started)


def detach(home: Home, records: LayerRecords, root: Path | str, layer: str) -> Mounted:
    """Remove ``layer`` (a name, or NAME@V) from the read-only layers at ``root``, live."""
    started = time.monotonic()
    path = real_root(root)
    ref = parse_ref(layer, "layer name")
    with root_lock(home, path):
        rec, mounts = _live_record(home, records, path)
        name_of = {v.ref: v.ref.rpartition("@")[0] for v in rec.layers}
        stack = [
            v
            for v in rec.layers
            if not (name_of[v.ref] == ref.name and (ref.version is None or v.ref == str(ref)))
        ]
        if len(stack) == len(rec.layers):
            raise NotFound(f"{layer} is not attached to {path}")
        if not stack:
            raise UsageError(f"{layer} is the only layer at {path}: umount instead")
        lowers = [prepare_version(home, v, {}, mounts) for v in _with_top(rec, stack)]
        rec = _switch(home, records, path, rec, stack, lowers)
    return mounted(path, rec, started=started)


def _with_top(rec: MountRecord, stack: list[VersionInfo]) -> list[VersionInfo]:
    return [rec.writable_version, *stack] if rec.writable_version else stack


def _live_record(home: Home, records: LayerRecords, path: Path) -> tuple[MountRecord, set[str]]:
    """The record of a root lamina has mounted, and this namespace's mountpoints."""
    rec = records.find_mount(HOST, str(path))
    mounts = overlay.mountinfo()
    if rec is None or not Layout.of(home, rec.id).live_at(path, mounts):
        raise NotFound(f"{path} is not mounted by lamina")
    return rec, {m.mountpoint for m in mounts}


def _switch(
    home: Home,
    records: LayerRecords,
    path: Path,
    rec: MountRecord,
    stack: list[VersionInfo],
    lowers: list[Path],
) -> MountRecord:
    """Record the new layer list, then slide the new overlay in under the old one."""
    layout = Layout.of(home, rec.id)
    work = layout.work(rec.generation + 1)
    work.mkdir(parents=True, exist_ok=True)
    fd = overlay.compose(lowers, layout.upper, work)
    # The switch runs inside the transaction: a failed switch records nothing.
    records.set_layers(rec.id, stack, lambda: overlay.switch(fd, path))
    layout.add_device(overlay.device(path))
    return replace(rec, layers=list(stack), generation=rec.generation + 1)
