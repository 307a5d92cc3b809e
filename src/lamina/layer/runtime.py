"""Composed roots on this host: mount, attach, detach, umount (what an agent calls).

Each mounted root has a record in the database (host, root, read-only layers in order,
writable layer and the version beneath its session) and a state folder
``<home>/mounts/<id>/``: ``upper/`` (the session's changes), ``work/<generation>/`` (one
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from lamina.errors import Conflict, NotFound, UsageError
from lamina.home import Home
from lamina.layer import mountapi, overlay, prepare
from lamina.layer.compose import WritablePolicy, clashes, name_clashes
from lamina.layer.writable import Kept, VersionInfo, keep_session, loader
from lamina.locks import locked
from lamina.names import parse_ref

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
    writable_version: str | None  # the version beneath this session's changes
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
class _Layout:
    dir: Path

    @classmethod
    def of(cls, home: Home, mount_id: int) -> _Layout:
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


def _root_lock(home: Home, root: Path) -> AbstractContextManager[None]:
    name = hashlib.sha256(os.fsencode(root)).hexdigest()[:32]
    return locked(home.root / "run" / "roots" / f"{name}.lock")


def _root(root: Path | str) -> Path:
    path = Path(os.path.realpath(root))
    if not path.is_dir():
        raise NotFound(f"{root}: no such directory")
    return path


# -- records -> plain values ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Record:
    id: int
    layers: list[VersionInfo]
    writable: str | None
    writable_version: VersionInfo | None
    policy: WritablePolicy
    generation: int


def version_info(v: object) -> VersionInfo:
    from lamina.manager.models import LayerVersion

    assert isinstance(v, LayerVersion)
    return VersionInfo(v.id, v.ref, v.manifest_id, v.layer_id)


def _record(m: object) -> _Record:
    from lamina.manager.models import LayerMount

    assert isinstance(m, LayerMount)
    return _Record(
        m.id,
        [version_info(ml.version) for ml in m.layers],
        m.writable_layer.name if m.writable_layer else None,
        version_info(m.writable_version) if m.writable_version else None,
        WritablePolicy(m.policy),
        m.generation,
    )


def _load(home: Home, root: Path) -> _Record | None:
    from lamina.manager.services import layers as svc

    with home.session() as session:
        found = svc.find_mount(session, host=HOST, root=str(root))
        return _record(found) if found is not None else None


# -- preparing and checking layers ------------------------------------------------------------


def prepare_version(
    home: Home, v: VersionInfo, timings: dict[str, float], mounted: Collection[str] = ()
) -> Path:
    """The mountpoint of ``v``'s image on this host, built and mounted on first use
    (``mounted``: this namespace's mountpoints, when the caller has them at hand)."""
    ready = prepare.run_dir(home.root) / v.manifest
    if str(ready) in mounted:
        return ready

    done = prepare.prepare(home.root, home.store, v.manifest, loader(home, v.manifest))
    if done.prepared_seconds:
        timings[v.ref] = round(done.prepared_seconds, 3)
    return done.mountpoint


def _conflicts(home: Home, stack: Sequence[VersionInfo], only: int | None) -> list[LayerConflict]:
    """Clashes between app layers: every read-only layer but the bottom one (the base)."""
    apps = list(stack[:-1])
    if len(apps) < 2:
        return []
    prints = [prepare.fingerprint(home.root, v.manifest) for v in apps]
    found = clashes(prints, only=only)
    if not found:
        return []
    named = name_clashes(found, lambda i: loader(home, apps[i].manifest)())
    return [LayerConflict(path, apps[a].ref, apps[b].ref) for path, a, b in named]


def _refuse(home: Home, conflicts: list[LayerConflict], strict: bool) -> None:
    if strict and conflicts:
        release(home)  # the images just mounted for the check
        c = conflicts[0]
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise Conflict(f"layers conflict: /{c.path} differs in {c.first} and {c.second}{more}")


def _mounted(
    root: Path,
    rec: _Record,
    conflicts: list[LayerConflict] | None = None,
    prepared: dict[str, float] | None = None,
    started: float | None = None,
) -> Mounted:
    return Mounted(
        str(root),
        [v.ref for v in rec.layers],
        rec.writable,
        rec.writable_version.ref if rec.writable_version else None,
        str(rec.policy),
        rec.generation,
        conflicts or [],
        prepared or {},
        time.monotonic() - started if started is not None else 0.0,
    )


# -- mount ------------------------------------------------------------------------------------


def mount(
    home: Home,
    root: Path | str,
    layers: Sequence[str],
    *,
    writable: str | None = None,
    policy: WritablePolicy | str = WritablePolicy.ALL,
    strict: bool = False,
) -> Mounted:
    """Compose ``layers`` (first wins) at ``root`` with a writable upper layer."""
    from lamina.manager.models import LayerVersion
    from lamina.manager.services import layers as svc

    started = time.monotonic()
    if not layers:
        raise UsageError("mount needs at least one --layer")
    policy = WritablePolicy(policy)
    path = _root(root)
    with _root_lock(home, path):
        _recover_stale(home, path)
        with home.session() as session:
            versions = [svc.get_version(session, parse_ref(r, "layer name")) for r in layers]
            stack = [version_info(v) for v in versions]
            if len({v.layer_id for v in stack}) != len(stack):
                raise UsageError("a layer can appear only once in a mount")
            previous = holder = None
            if writable is not None:
                layer = svc.ensure_writable(session, writable)
                latest = svc.latest_version(session, layer)
                previous = version_info(latest) if latest is not None else None
                found = svc.writable_mount(session, layer=layer)
                holder = (found.host, found.root) if found is not None else None
        if holder is not None and holder[0] == HOST and holder[1] != str(path):
            try:
                with _root_lock(home, Path(holder[1])):
                    _recover_stale(home, Path(holder[1]))
            except Conflict:
                raise Conflict(f"writable layer {writable!r} is mounted on {holder[1]}") from None
        timings: dict[str, float] = {}
        top = [previous] if previous is not None else []
        lowers = [prepare_version(home, v, timings) for v in [*top, *stack]]
        conflicts = _conflicts(home, stack, None)
        _refuse(home, conflicts, strict)
        with home.session() as session:
            record = svc.add_mount(
                session,
                host=HOST,
                root=str(path),
                layers=versions,
                writable=svc.ensure_writable(session, writable) if writable else None,
                writable_version=session.get(LayerVersion, previous.id) if previous else None,
                policy=str(policy),
            )
            rec = _record(record)
        _compose_first(home, path, rec, lowers, stack)
    return _mounted(path, rec, conflicts, timings, started)


def _compose_first(
    home: Home, path: Path, rec: _Record, lowers: list[Path], stack: list[VersionInfo]
) -> None:
    layout = _Layout.of(home, rec.id)
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
        from lamina.manager.services import layers as svc

        with home.session() as session:
            found = svc.find_mount(session, host=HOST, root=str(path))
            if found is not None:
                svc.delete_mount(session, mount=found)
        shutil.rmtree(layout.dir, ignore_errors=True)
        release(home)
        raise


def _recover_stale(home: Home, path: Path) -> Unmounted | None:
    """A record for ``path`` whose overlay is gone (a crash, a reboot): keep its session's
    changes now, as its umount would have."""
    rec = _load(home, path)
    if rec is None:
        return None
    layout = _Layout.of(home, rec.id)
    if layout.live_at(path):
        raise Conflict(f"{path} is already mounted (lamina umount it first)")
    return _finish(home, path, rec, layout)


# -- attach / detach --------------------------------------------------------------------------


def attach(home: Home, root: Path | str, layer: str, *, strict: bool = False) -> Mounted:
    """Add ``layer`` on top of the read-only layers at ``root``, live."""
    from lamina.manager.services import layers as svc

    started = time.monotonic()
    path = _root(root)
    with _root_lock(home, path):
        rec, mounted = _live_record(home, path)
        with home.session() as session:
            new = version_info(svc.get_version(session, parse_ref(layer, "layer name")))
        same = [v.ref for v in rec.layers if v.layer_id == new.layer_id]
        if same:
            raise Conflict(f"{same[0]} is already attached to {path}")
        stack = [new, *rec.layers]
        timings: dict[str, float] = {}
        lowers = [prepare_version(home, v, timings, mounted) for v in _with_top(rec, stack)]
        conflicts = _conflicts(home, stack, 0)
        _refuse(home, conflicts, strict)
        rec = _switch(home, path, rec, stack, lowers)
    return _mounted(path, rec, conflicts, timings, started)


def detach(home: Home, root: Path | str, layer: str) -> Mounted:
    """Remove ``layer`` (a name, or NAME@V) from the read-only layers at ``root``, live."""
    started = time.monotonic()
    path = _root(root)
    ref = parse_ref(layer, "layer name")
    with _root_lock(home, path):
        rec, mounted = _live_record(home, path)
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
        lowers = [prepare_version(home, v, {}, mounted) for v in _with_top(rec, stack)]
        rec = _switch(home, path, rec, stack, lowers)
    return _mounted(path, rec, started=started)


def _with_top(rec: _Record, stack: list[VersionInfo]) -> list[VersionInfo]:
    return [rec.writable_version, *stack] if rec.writable_version else stack


def _live_record(home: Home, path: Path) -> tuple[_Record, set[str]]:
    """The record of a root lamina has mounted, and this namespace's mountpoints."""
    rec = _load(home, path)
    mounts = overlay.mountinfo()
    if rec is None or not _Layout.of(home, rec.id).live_at(path, mounts):
        raise NotFound(f"{path} is not mounted by lamina")
    return rec, {m.mountpoint for m in mounts}


def _switch(
    home: Home, path: Path, rec: _Record, stack: list[VersionInfo], lowers: list[Path]
) -> _Record:
    """Record the new layer list, then slide the new overlay in under the old one."""
    from lamina.manager.models import LayerMount, LayerVersion
    from lamina.manager.services import layers as svc

    layout = _Layout.of(home, rec.id)
    work = layout.work(rec.generation + 1)
    work.mkdir(parents=True, exist_ok=True)
    fd = overlay.compose(lowers, layout.upper, work)
    with home.session() as session:
        record = session.get_one(LayerMount, rec.id)
        versions = [session.get_one(LayerVersion, v.id) for v in stack]
        svc.set_mount_layers(session, mount=record, layers=versions)
        overlay.switch(fd, path)  # inside the transaction: a failed switch records nothing
    layout.add_device(overlay.device(path))
    return replace(rec, layers=list(stack), generation=rec.generation + 1)


# -- umount -----------------------------------------------------------------------------------


def umount(home: Home, root: Path | str) -> Unmounted:
    """Unmount ``root``; keep what the policy keeps as a new writable-layer version."""
    path = Path(os.path.realpath(root))
    with _root_lock(home, path):
        rec = _load(home, path)
        if rec is None:
            raise NotFound(f"{path} is not mounted by lamina")
        layout = _Layout.of(home, rec.id)
        if layout.live_at(path):
            _unmount(path, layout)
        return _finish(home, path, rec, layout)


def _unmount(path: Path, layout: _Layout) -> None:
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


def _finish(home: Home, path: Path, rec: _Record, layout: _Layout) -> Unmounted:
    kept: Kept = keep_session(
        home,
        mount_id=rec.id,
        upper=layout.upper,
        writable=rec.writable,
        previous=rec.writable_version,
        bases=rec.layers,
        policy=rec.policy,
    )
    shutil.rmtree(layout.dir, ignore_errors=True)
    release(home)
    return Unmounted(str(path), rec.writable, kept.ref, kept.kept, kept.dropped)


def release(home: Home) -> list[str]:
    """Unmount this host's layer images that no mounted root uses any more."""
    from lamina.manager.services import layers as svc

    with home.session() as session:
        keep = set()
        for m in svc.mounts_on(session, host=HOST):
            keep |= {ml.version.manifest_id for ml in m.layers}
            if m.writable_version is not None:
                keep.add(m.writable_version.manifest_id)
    return prepare.release_unused(home.root, keep)


def mounts(home: Home) -> list[Mounted]:
    """The roots lamina has mounted on this host."""
    from lamina.manager.services import layers as svc

    with home.session() as session:
        recs = [(m.root, _record(m)) for m in svc.mounts_on(session, host=HOST)]
    return [_mounted(Path(root), rec) for root, rec in recs]
