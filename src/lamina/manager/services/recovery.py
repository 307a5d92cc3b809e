"""Roots in the store that the database does not know: what the packs can tell.

A pack holds chunks and nothing else, so what survives the loss of the database is what a
chunk says about itself. Manifests do: an image version's block table starts with
``LMIM`` (``lamina.image.manifest``), a layer version's file tree with ``LMFT``
(``lamina.layer.tree``), and either names every chunk it needs. The packs cannot tell
names, version numbers, dates, which layer a version was made on, writable layers' users
and policies, machines, users, groups or entitlements: those live only in the database.

So ``store gc`` keeps every unreferenced manifest the database did not record removing
(``RemovedRoot``) and all it names, and ``store reindex`` records each as a version:
an image manifest as ``recovered-<12 hex digits of its id>@1``, a file tree as an app
layer of that name. A manifest that another candidate names as content (a disk image
holding a lamina store, say) is content, not a root.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from lamina.errors import CorruptObject, NotFound
from lamina.manager.models import RemovedRoot
from lamina.store import ChunkStore

IMAGE_MAGIC = b"LMIM"
TREE_MAGIC = b"LMFT"
RECOVERED = "recovered-"


@dataclass(frozen=True, slots=True)
class FoundRoot:
    kind: str  # image | layer
    manifest_id: bytes
    size: int  # image: its size; layer: bytes of file data
    files: int  # layer: entries in its tree
    references: frozenset[bytes]

    @property
    def name(self) -> str:
        return RECOVERED + self.manifest_id.hex()[:12]


def _parse(store: ChunkStore, cid: bytes) -> FoundRoot | None:
    """The root ``cid`` is, or None when it is not one (data that only starts alike)."""
    from lamina.image import Manifest
    from lamina.layer.tree import Tree

    try:
        magic = store.peek(cid, 4)
        if magic not in (IMAGE_MAGIC, TREE_MAGIC):
            return None
        data = store.get(cid)
        if magic == IMAGE_MAGIC:
            m = Manifest.from_bytes(data)
            return FoundRoot("image", cid, m.size, 0, frozenset(m.referenced()))
        tree = Tree.from_bytes(data)
        return FoundRoot("layer", cid, tree.data_bytes, len(tree), frozenset(tree.referenced()))
    except (CorruptObject, NotFound, ValueError):
        return None


def unknown_roots(
    session: Session, store: ChunkStore, candidates: Iterable[bytes]
) -> list[FoundRoot]:
    """The roots among ``candidates`` (chunks no known version references) that the
    database did not record removing."""
    found = [r for cid in candidates if (r := _parse(store, cid)) is not None]
    named = set().union(*(r.references for r in found)) if found else set()
    removed = set(session.scalars(select(RemovedRoot.manifest_id)))
    return [r for r in found if r.manifest_id not in named and r.manifest_id.hex() not in removed]


def forget_collected(session: Session, store: ChunkStore) -> int:
    """Drop the removal records of manifests gc has collected; returns how many."""
    rows = list(session.scalars(select(RemovedRoot)))
    gone = [r for r in rows if not store.has(bytes.fromhex(r.manifest_id))]
    for row in gone:
        session.delete(row)
    return len(gone)


def record(session: Session, store: ChunkStore, root: FoundRoot) -> str:
    """Record a found root as the next version of ``recovered-<id>``; returns NAME@N."""
    from lamina.image import Manifest
    from lamina.image.importer import Imported, ImportStats
    from lamina.layer.records import NewVersion
    from lamina.manager.services import images, layers

    source = "recovered from the chunk store by `lamina store reindex`"
    if root.kind == "image":
        manifest = Manifest.from_bytes(store.get(root.manifest_id))
        stats = ImportStats(manifest.size, 0, manifest.count, 0, 0, "recovered")
        imported = Imported(manifest, root.manifest_id, stats)
        return images.add_version(session, name=root.name, imported=imported, source=source).ref
    new = NewVersion(root.manifest_id, root.files, root.size, 0, source)
    return layers.add_version(session, name=root.name, kind="app", new=new).ref
