"""Keep a root's changes: an overlayfs upper directory -> the next writable-layer version.

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

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lamina.home import Home
from lamina.layer import prepare
from lamina.layer.builder import Built, Permits
from lamina.layer.changes import WritablePolicy, filter_policy, merge_changes, prune
from lamina.layer.conflicts import path_hash
from lamina.layer.importer import load_tree, new_version, scan, store_files, store_manifest
from lamina.layer.records import LayerRecords, VersionInfo
from lamina.layer.sources import DirSource

# What runs in a mounted root may create devices and setuid files (as root only): they are
# the user's.
CHANGES = Permits(allow_devices=True, allow_setuid=True)


@dataclass(frozen=True, slots=True)
class Kept:
    ref: str | None  # the new version, None when nothing changed
    kept: int  # changed paths the policy kept
    dropped: list[str]  # changed paths the policy dropped


def _in_bases(home: Home, bases: Sequence[VersionInfo]) -> Callable[[str], bool]:
    """Whether some base has a path: by fingerprint, or on disk for a provided version."""
    hashes: set[int] = set()
    dirs: list[Path] = []
    for b in bases:
        directory = prepare.provided(b.manifest_id)
        if directory is not None:
            dirs.append(directory)
            continue
        prepare.prepare_image(home.root, home.store, b.manifest_id, loader(home, b.manifest_id))
        hashes.update(prepare.fingerprint(home.root, b.manifest_id).keys)
    return lambda p: path_hash(p) in hashes or any(os.path.lexists(d / p) for d in dirs)


def loader(home: Home, manifest_id: bytes) -> prepare.Loader:
    """Loads a layer version's tree from the home's store when called."""
    return lambda: load_tree(home.store, manifest_id)


def keep_changes(
    home: Home,
    records: LayerRecords,
    *,
    mount_id: int,
    upper: Path,
    writable: str | None,
    previous: VersionInfo | None,
    bases: Sequence[VersionInfo],
    policy: WritablePolicy,
    made_on: str,
) -> Kept:
    """Store the kept part of ``upper`` as the next version of ``writable`` (if any) and
    drop the mount's record, atomically; without a writable layer, just drop the record.
    ``made_on`` (HOST:ROOT) goes into the version's source."""
    if writable is None or not upper.is_dir():
        records.end_mount(mount_id)
        return Kept(None, 0, [])
    source = DirSource(upper, changes=True)
    changes = scan(source, CHANGES, root=False)
    kept_tree, dropped = filter_policy(changes.tree, policy)
    kept = Built(kept_tree, {p: r for p, r in changes.refs.items() if kept_tree.get(p)})
    before = load_tree(home.store, previous.manifest_id) if previous else None
    in_bases = _in_bases(home, bases)
    same_bases = previous is not None and records.base_ids(previous.id) == [b.id for b in bases]
    with home.store.writer() as writer:
        stored_changes, new, stored = store_files(writer, source, kept)
        merged = merge_changes(before, stored_changes)
        merged = prune(filter_policy(merged, policy)[0], in_bases)
        version = None
        if before is None or merged != before or not same_bases:
            imported = store_manifest(writer, merged, new, stored)
            writer.flush()  # chunks durable before the database points at them
            version = new_version(imported, f"session on {made_on}")
        # Recorded while the writer holds the store's shared lock: gc keeps its chunks.
        ref = records.end_mount(mount_id, keep=version, bases=bases, parent=previous)
    return Kept(ref, len(kept_tree), dropped)
