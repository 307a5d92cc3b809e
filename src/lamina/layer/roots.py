"""Mount a composed root on this host, and umount it (live attach and detach: ``attach``).

Each mounted root has a record in the database (host, root, read-only layers in order,
writable layer and the version beneath its changes; reached through ``LayerRecords``, which
the caller passes in) and a state folder
``<home>/mounts/<id>/``: ``upper/`` (the root's changes), ``work/<generation>/`` (one
overlayfs work directory per generation, so a new overlay never cleans the work directory
of one still draining), ``devices`` (the device number of every generation, one a line, to
find processes still inside an old one; appended, because replacing a file on ext4 waits
for its data, 2 ms measured). Operations on one root are serialized by a lock file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from lamina.errors import Conflict, NotFound, UsageError
from lamina.home import Home
from lamina.layer import mountapi, overlay, prepare
from lamina.layer.changes import WritablePolicy
from lamina.layer.conflicts import check_order, clashes, name_clashes
from lamina.layer.records import LayerRecords, MountRecord, VersionInfo
from lamina.layer.writable import Kept, keep_changes, loader
from lamina.locks import locked

HOST = socket.gethostname()


@dataclass(frozen=True, slots=True)
class LayerConflict:
    path: str
    first: str  # the layer that wins (higher priority)
    second: str


@dataclass(frozen=True, slots=True)
class Mounted:
    root: str
    layers: list[str]  # read-only layer versions, first wins
    writable: str | None
    writable_version: str | None  # the version beneath this root's changes
    policy: str
    generation: int
    conflicts: list[LayerConflict] = field(default_factory=list)
    prepared: dict[str, float] = field(default_factory=dict)  # ref -> first-time seconds
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Unmounted:
    root: str
    writable: str | None
    saved: str | None  # the new writable-layer version, None when nothing changed
    kept: int
    dropped: list[str]


# -- state on disk ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    dir: Path

    @classmethod
    def of(cls, home: Home, mount_id: int) -> Layout:
        return cls(home.root / "mounts" / str(mount_id))

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    def work(self, generation: int) -> Path:
        return self.dir / "work" / str(generation)

    def devices(self) -> set[int]:
        try:
            text = (self.dir / "devices").read_text()
        except OSError:
            return set()
        return {int(line) for line in text.split() if line.isdigit()}

    def add_device(self, dev: int) -> None:
        with open(self.dir / "devices", "a", encoding="ascii") as f:
            f.write(f"{dev}\n")

    def live_at(self, root: Path, mounts: Sequence[overlay.MountInfo] | None = None) -> bool:
        top = overlay.mounted_at(root, mounts)
        mine = f"upperdir={self.upper},"
        return top is not None and top.fstype == "overlay" and mine in top.options + ","


def root_lock(home: Home, root: Path) -> AbstractContextManager[None]:
    name = hashlib.sha256(os.fsencode(root)).hexdigest()[:32]
    return locked(home.root / "run" / "roots" / f"{name}.lock")


def real_root(root: Path | str) -> Path:
    path = Path(os.path.realpath(root))
    if not path.is_dir():
        raise NotFound(f"{root}: no such directory")
    return path


def _load(records: LayerRecords, root: Path) -> MountRecord | None:
    return records.find_mount(HOST, str(root))


# -- preparing and checking layers ------------------------------------------------------------


def prepare_version(
    home: Home, v: VersionInfo, timings: dict[str, float], mounted: Collection[str] = ()
) -> Path:
    """The mountpoint of ``v``'s image on this host, built and mounted on first use
    (``mounted``: this namespace's mountpoints, when the caller has them at hand)."""
    ready = prepare.mountpoint(home.root, v.manifest_id)
    if str(ready) in mounted:
        return ready

    done = prepare.prepare(home.root, home.store, v.manifest_id, loader(home, v.manifest_id))
    if done.prepared_seconds:
        timings[v.ref] = round(done.prepared_seconds, 3)
    return done.mountpoint


def conflicts(home: Home, stack: Sequence[VersionInfo], only: int | None) -> list[LayerConflict]:
    """Clashes between app layers: every read-only layer but the bottom one (the base)."""
    apps = list(stack[:-1])
    if len(apps) < 2:
        return []
    prints = [prepare.fingerprint(home.root, v.manifest_id) for v in apps]
    found = clashes(prints, only=only)
    if not found:
        return []
    named = name_clashes(found, lambda i: loader(home, apps[i].manifest_id)())
    return [LayerConflict(path, apps[a].ref, apps[b].ref) for path, a, b in named]


def refuse(home: Home, records: LayerRecords, conflicts: list[LayerConflict], strict: bool) -> None:
    if strict and conflicts:
        release(home, records)  # the images just mounted for the check
        c = conflicts[0]
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise Conflict(f"layers conflict: /{c.path} differs in {c.first} and {c.second}{more}")


def mounted(
    root: Path,
    rec: MountRecord,
    conflicts: list[LayerConflict] | None = None,
    prepared: dict[str, float] | None = None,
    started: float | None = None,
) -> Mounted:
    return Mounted(
        str(root),
        [v.ref for v in rec.layers],
        rec.writable,
        rec.writable_version.ref if rec.writable_version else None,
        rec.policy,
        rec.generation,
        conflicts or [],
        prepared or {},
        time.monotonic() - started if started is not None else 0.0,
    )


# -- mount ------------------------------------------------------------------------------------


def mount(
    home: Home,
    records: LayerRecords,
    root: Path | str,
    layers: Sequence[str],
    *,
    writable: str | None = None,
    policy: WritablePolicy | str = WritablePolicy.ALL,
    strict: bool = False,
) -> Mounted:
    """Compose ``layers`` (first wins) at ``root`` with a writable upper layer."""
    started = time.monotonic()
    if not layers:
        raise UsageError("mount needs at least one --layer")
    policy = WritablePolicy(policy)
    path = real_root(root)
    with root_lock(home, path):
        _recover_stale(home, records, path)
        stack = records.versions(layers)
        if len({v.layer_id for v in stack}) != len(stack):
            raise UsageError("a layer can appear only once in a mount")
        bases = records.base_refs([v.id for v in stack])
        check_order([(v.ref, b) for v, b in zip(stack, bases, strict=True)])
        state = records.writable(writable) if writable is not None else None
        previous = state.latest if state is not None else None
        holder = state.mounted_on if state is not None else None
        if holder is not None and holder[0] == HOST and holder[1] != str(path):
            try:
                with root_lock(home, Path(holder[1])):
                    _recover_stale(home, records, Path(holder[1]))
            except Conflict:
                raise Conflict(f"writable layer {writable!r} is mounted on {holder[1]}") from None
        timings: dict[str, float] = {}
        top = [previous] if previous is not None else []
        lowers = [prepare_version(home, v, timings) for v in [*top, *stack]]
        found = conflicts(home, stack, None)
        refuse(home, records, found, strict)
        rec = records.add_mount(
            host=HOST,
            root=str(path),
            layers=stack,
            writable=writable,
            writable_version=previous,
            policy=str(policy),
        )
        _compose_first(home, records, path, rec, lowers)
    return mounted(path, rec, found, timings, started)


def _compose_first(
    home: Home, records: LayerRecords, path: Path, rec: MountRecord, lowers: list[Path]
) -> None:
    layout = Layout.of(home, rec.id)
    try:
        shutil.rmtree(layout.dir, ignore_errors=True)
        layout.upper.mkdir(parents=True)
        layout.work(rec.generation).mkdir(parents=True)
        base = os.stat(lowers[-1])  # the root directory looks like the base's
        os.chown(layout.upper, base.st_uid, base.st_gid)
        os.chmod(layout.upper, base.st_mode & 0o7777)
        overlay.mount_new(overlay.compose(lowers, layout.upper, layout.work(rec.generation)), path)
        layout.add_device(overlay.device(path))
    except BaseException:
        records.end_mount(rec.id)
        shutil.rmtree(layout.dir, ignore_errors=True)
        release(home, records)
        raise


def _recover_stale(home: Home, records: LayerRecords, path: Path) -> Unmounted | None:
    """A record for ``path`` whose overlay is gone (a crash, a reboot): keep its changes
    now, as its umount would have."""
    rec = _load(records, path)
    if rec is None:
        return None
    layout = Layout.of(home, rec.id)
    if layout.live_at(path):
        raise Conflict(f"{path} is already mounted (lamina umount it first)")
    return _finish(home, records, path, rec, layout)


# -- umount -----------------------------------------------------------------------------------


def umount(home: Home, records: LayerRecords, root: Path | str) -> Unmounted:
    """Unmount ``root``; keep what the policy keeps as a new writable-layer version."""
    path = Path(os.path.realpath(root))
    with root_lock(home, path):
        rec = _load(records, path)
        if rec is None:
            raise NotFound(f"{path} is not mounted by lamina")
        layout = Layout.of(home, rec.id)
        if layout.live_at(path):
            _unmount(path, layout)
        return _finish(home, records, path, rec, layout)


def _unmount(path: Path, layout: Layout) -> None:
    devices = layout.devices() | {overlay.device(path)}
    busy = overlay.users(devices)
    if busy:
        who = ", ".join(f"{pid} ({comm})" for pid, comm in busy[:5])
        raise Conflict(f"{path} is in use by pid {who}: nothing was unmounted")
    try:
        for sub in overlay.submounts(path):
            mountapi.umount(Path(sub.mountpoint))
        mountapi.umount(path)
    except OSError as exc:
        raise Conflict(f"cannot unmount {path}: {exc.strerror}") from None


def _finish(
    home: Home, records: LayerRecords, path: Path, rec: MountRecord, layout: Layout
) -> Unmounted:
    kept: Kept = keep_changes(
        home,
        records,
        mount_id=rec.id,
        upper=layout.upper,
        writable=rec.writable,
        previous=rec.writable_version,
        bases=rec.layers,
        policy=WritablePolicy(rec.policy),
        made_on=f"{HOST}:{path}",
    )
    shutil.rmtree(layout.dir, ignore_errors=True)
    release(home, records)
    return Unmounted(str(path), rec.writable, kept.ref, kept.kept, kept.dropped)


def release(home: Home, records: LayerRecords) -> list[bytes]:
    """Unmount this host's layer images that no mounted root uses any more; returns the
    manifest ids released."""
    keep: set[bytes] = set()
    for m in records.mounts_on(HOST):
        keep |= {v.manifest_id for v in m.layers}
        if m.writable_version is not None:
            keep.add(m.writable_version.manifest_id)
    return prepare.release_unused(home.root, keep)


def mounts(home: Home, records: LayerRecords) -> list[Mounted]:
    """The roots lamina has mounted on this host."""
    return [mounted(Path(m.root), m) for m in records.mounts_on(HOST)]
