"""What the chunk store must keep: the roots every subsystem holds."""

from __future__ import annotations

from sqlalchemy.orm import Session

from lamina.manager.services import images
from lamina.store import ChunkStore


def live_chunks(session: Session, *, store: ChunkStore) -> set[bytes]:
    """Every chunk id referenced by an image version (manifests included)."""
    live: set[bytes] = set()
    for version in images.list_all_versions(session):
        live.add(bytes.fromhex(version.manifest_id))
        live |= images.load_manifest(store, version).referenced()
    return live
