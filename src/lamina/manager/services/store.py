"""What the chunk store must keep: the roots (manifests) every subsystem holds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy.orm import Session

from lamina.errors import CorruptObject, NotFound
from lamina.manager.services import images, layers
from lamina.store import ChunkStore


@dataclass(frozen=True, slots=True)
class Root:
    ref: str  # image or layer version, e.g. "base@2", "layer app@1"
    manifest_id: bytes
    logical: int  # bytes it stands for (image size, layer file bytes)
    references: Callable[[], set[bytes]]  # the chunks its manifest names (reads the store)


def roots(session: Session, *, store: ChunkStore) -> Iterator[Root]:
    """Every image version and layer version, with how to list the chunks it needs."""
    from lamina.image import Manifest
    from lamina.layer.importer import load_tree

    def image_refs(mid: bytes) -> Callable[[], set[bytes]]:
        return lambda: Manifest.from_bytes(store.get(mid)).referenced()

    def layer_refs(mid: bytes) -> Callable[[], set[bytes]]:
        return lambda: load_tree(store, mid).referenced()

    for version in images.list_all_versions(session):
        mid = bytes.fromhex(version.manifest_id)
        yield Root(version.ref, mid, version.size, image_refs(mid))
    for lv in layers.list_all_versions(session):
        mid = bytes.fromhex(lv.manifest_id)
        yield Root(f"layer {lv.layer.name}@{lv.version}", mid, lv.size, layer_refs(mid))
        if lv.image_manifest_id is not None:  # its EROFS image (lamina.layer.erofs)
            iid = bytes.fromhex(lv.image_manifest_id)
            yield Root(f"layer image {lv.layer.name}@{lv.version}", iid, 0, image_refs(iid))


def live_chunks(session: Session, *, store: ChunkStore) -> set[bytes]:
    """Every chunk id referenced by an image or layer version (manifests included)."""
    live: set[bytes] = set()
    for root in roots(session, store=store):
        live.add(root.manifest_id)
        live |= root.references()
    return live


def missing_references(session: Session, *, store: ChunkStore) -> list[tuple[str, str]]:
    """(chunk id, what is wrong) for every manifest or chunk a root needs and cannot get."""
    problems: list[tuple[str, str]] = []
    for root in roots(session, store=store):
        if not store.has(root.manifest_id):
            problems.append((root.manifest_id.hex(), f"manifest of {root.ref} is missing"))
            continue
        try:
            refs = root.references()
        except (CorruptObject, NotFound) as exc:
            problems.append((root.manifest_id.hex(), f"manifest of {root.ref}: {exc}"))
            continue
        present = store.index.lookup_many(refs)
        problems += [
            (c.hex(), f"referenced by {root.ref}, missing") for c in refs if c not in present
        ]
    return problems


def logical_bytes(session: Session, *, store: ChunkStore) -> tuple[int, int]:
    """(number of roots, bytes they stand for) - the numerator of the dedup ratio."""
    count = total = 0
    for root in roots(session, store=store):
        count += 1
        total += root.logical
    return count, total
