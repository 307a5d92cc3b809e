"""What the chunk store must keep: the roots every subsystem holds."""

from __future__ import annotations

from sqlalchemy.orm import Session

from lamina.manager.services import images, layers
from lamina.store import ChunkStore


def live_chunks(session: Session, *, store: ChunkStore) -> set[bytes]:
    """Every chunk id referenced by an image or layer version (manifests included)."""
    from lamina.layer.importer import load_tree

    live: set[bytes] = set()
    for version in images.list_all_versions(session):
        live.add(bytes.fromhex(version.manifest_id))
        live |= images.load_manifest(store, version).referenced()
    for manifest in layers.manifest_ids(session):
        mid = bytes.fromhex(manifest)
        live.add(mid)
        live |= load_tree(store, mid).referenced()
    return live
