"""Keep a session's changes: an overlayfs upper directory -> the next writable-layer version.

A writable-layer version is a set of file-level changes (files, directories, symlinks,
whiteouts, opaque directories) against the read-only layers it was made on, which it
records in order as its bases, with the version it continues as its parent. That is all
a 3-way rebase needs: old base, new base, and the user's changes at file level.

Steps: scan the upper directory; keep what the policy keeps (data of dropped files is never
read); merge onto the previous version; prune whiteouts that hide nothing in the bases;
store the files' data, then the manifest; record the version and release the mount in one
database transaction. A crash before that commit leaves the previous version current and
the upper directory in place, so the next ``umount`` (or ``mount`` of the same root or
writable layer) keeps it then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lamina.home import Home
from lamina.layer import prepare
from lamina.layer.builder import Built, Policy
from lamina.layer.compose import WritablePolicy, filter_policy, merge_changes, path_hash, prune
from lamina.layer.importer import load_tree, new_version, scan, store_files, store_manifest
from lamina.layer.sources import DirSource

# A session may create devices and setuid files (as root only): they are the user's.
SESSION = Policy(allow_devices=True, allow_setuid=True)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """What the runtime knows of a layer version outside any database session."""

    id: int
    ref: str
    manifest: str
    layer_id: int


@dataclass(frozen=True, slots=True)
class Kept:
    ref: str | None  # the new version, None when nothing changed
    kept: int  # changed paths the policy kept
    dropped: list[str]  # changed paths the policy dropped


def _base_paths(home: Home, bases: Sequence[VersionInfo]) -> set[int]:
    hashes: set[int] = set()
    for b in bases:
        prepare.prepare_image(home.root, home.store, b.manifest, loader(home, b.manifest))
        hashes.update(prepare.fingerprint(home.root, b.manifest).keys)
    return hashes


def loader(home: Home, manifest: str) -> prepare.Loader:
    """Loads a layer version's tree from the home's store when called."""
    return lambda: load_tree(home.store, bytes.fromhex(manifest))


def keep_session(
    home: Home,
    *,
    mount_id: int,
    upper: Path,
    writable: str | None,
    previous: VersionInfo | None,
    bases: Sequence[VersionInfo],
    policy: WritablePolicy,
) -> Kept:
    """Store the kept part of ``upper`` as the next version of ``writable`` (if any) and
    drop the mount's record, atomically; without a writable layer, just drop the record."""
    from lamina.manager.models import LayerMount, LayerVersion
    from lamina.manager.services import layers as svc

    if writable is None or not upper.is_dir():
        with home.session() as session:
            svc.delete_mount(session, mount=session.get_one(LayerMount, mount_id))
        return Kept(None, 0, [])
    source = DirSource(upper, changes=True)
    changes = scan(source, SESSION, root=False)
    kept_tree, dropped = filter_policy(changes.tree, policy)
    kept = Built(kept_tree, {p: r for p, r in changes.refs.items() if kept_tree.get(p)})
    before = load_tree(home.store, bytes.fromhex(previous.manifest)) if previous else None
    in_bases = _base_paths(home, bases)
    with home.store.writer() as writer:
        stored_changes, new, stored = store_files(writer, source, kept)
        merged = merge_changes(before, stored_changes)
        merged = prune(filter_policy(merged, policy)[0], lambda p: path_hash(p) in in_bases)
        with home.session() as session:
            mount = session.get_one(LayerMount, mount_id)
            prev = session.get(LayerVersion, previous.id) if previous else None
            same_bases = prev is not None and [b.base_id for b in prev.bases] == [
                b.id for b in bases
            ]
            ref = None
            if before is None or merged != before or not same_bases:
                imported = store_manifest(writer, merged, new, stored)
                writer.flush()  # chunks durable before the database points at them
                version = svc.add_version(
                    session,
                    name=writable,
                    kind=svc.WRITABLE,
                    new=new_version(imported, f"session on {mount.host}:{mount.root}"),
                    bases=[session.get_one(LayerVersion, b.id) for b in bases],
                    parent=prev,
                    policy=str(policy),
                )
                ref = version.ref
            svc.delete_mount(session, mount=mount)
    return Kept(ref, len(kept_tree), dropped)
