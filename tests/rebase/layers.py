"""Layers in a real home for rebase tests: bases imported from directories, writable-layer
versions stored the way ``umount`` stores them (a change set with its bases and parent)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lamina.home import Home
from lamina.layer.importer import import_layer, load_tree, store_manifest
from lamina.layer.records import WRITABLE, NewVersion
from lamina.layer.tree import Entry, Kind, Tree
from lamina.manager.layer_records import DatabaseRecords
from lamina.manager.services import layers as svc
from lamina.names import parse_ref
from lamina.rebase.views import flatten
from tests.rebase.trees import BLOBS, D, Spec, entry
from tests.trees import write_tree


def base(home: Home, tmp_path: Path, name: str, files: dict[str, str | bytes | None]) -> str:
    """Import ``files`` as the next version of app layer ``name``."""
    src = tmp_path / "src" / name
    n = 1
    while (src / str(n)).exists():
        n += 1
    return import_layer(home, DatabaseRecords(home), name, write_tree(src / str(n), files))[0]


def tree_of(home: Home, ref: str) -> Tree:
    with home.session() as session:
        manifest = svc.get_version(session, parse_ref(ref)).manifest_id
    return load_tree(home.store, bytes.fromhex(manifest))


def writable(
    home: Home,
    name: str,
    on: Sequence[str],
    specs: Mapping[str, Spec],
    *,
    policy: str = "all",
) -> str:
    """The next version of writable layer ``name``: ``specs`` (see ``tests.rebase.trees``)
    as a change set on the layers ``on``, parents copied up from them as overlayfs does."""
    view = flatten([tree_of(home, r) for r in on])
    out: dict[str, Entry] = {}
    with home.store.writer() as writer:
        for path, spec in specs.items():
            e = entry(path, spec)
            if e.kind is Kind.FILE:
                chunks = []
                for cid, n in e.chunks:
                    put = writer.put(BLOBS[cid])
                    chunks.append((put.chunk_id, n))
                e = Entry(path, Kind.FILE, e.mode, e.uid, e.gid, size=e.size, chunks=tuple(chunks))
            out[path] = e
            p = path
            while "/" in p:
                p = p.rpartition("/")[0]
                if p not in out:
                    have = view.get(p)
                    out[p] = have if have is not None and have.kind is Kind.DIR else entry(p, D)
        imported = store_manifest(writer, Tree.of(out.values()))
        writer.flush()
        with home.session() as session:
            layer = svc.ensure_writable(session, name)
            return svc.add_version(
                session,
                name=name,
                kind=WRITABLE,
                new=NewVersion(imported.manifest_id, imported.files, imported.size, 0, "test"),
                bases=[svc.get_version(session, parse_ref(r)) for r in on],
                parent=svc.latest_version(session, layer),
                policy=policy,
            ).ref
