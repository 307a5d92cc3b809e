"""Which chunks a machine may read: those of the image version it is pinned to, and of
the layer versions entitled to it and to its logged-in users, and those users' writable
layers' versions.

The layer versions are read from the database at every question (a ``Readable`` lives
for one request), so a revoked entitlement or an ended session takes effect on the next
request. What a manifest references never changes (it is named by its content), so
those sets are cached, a bounded number of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from lamina.image import Manifest
from lamina.image.manifest import MAGIC as IMAGE_MAGIC
from lamina.layer.importer import load_tree
from lamina.store import ChunkStore


class Referenced:
    """Chunk ids referenced by recently used manifests (bounded, any thread)."""

    def __init__(
        self, load: Callable[[ChunkStore, bytes], frozenset[bytes]], capacity: int = 64
    ) -> None:
        self._sets: OrderedDict[bytes, frozenset[bytes]] = OrderedDict()
        self._load = load
        self._lock = threading.Lock()
        self.capacity = capacity

    def get(self, store: ChunkStore, manifest_id: bytes) -> frozenset[bytes]:
        with self._lock:
            found = self._sets.get(manifest_id)
            if found is not None:
                self._sets.move_to_end(manifest_id)
                return found
        refs = self._load(store, manifest_id)
        with self._lock:
            self._sets[manifest_id] = refs
            while len(self._sets) > self.capacity:
                self._sets.popitem(last=False)
        return refs


def _image_refs(store: ChunkStore, manifest_id: bytes) -> frozenset[bytes]:
    return frozenset(Manifest.from_bytes(store.get(manifest_id)).referenced() | {manifest_id})


def _tree_refs(store: ChunkStore, manifest_id: bytes) -> frozenset[bytes]:
    """A layer version's references: its tree's, or its EROFS image's (an image manifest)."""
    data = store.get(manifest_id)
    if data[:4] == IMAGE_MAGIC:
        return frozenset(Manifest.from_bytes(data).referenced() | {manifest_id})
    return frozenset(load_tree(store, manifest_id).referenced() | {manifest_id})


IMAGES = Referenced(_image_refs)
TREES = Referenced(_tree_refs, capacity=256)


class Readable:
    """What one machine may read, for the length of one request: its image version's
    manifest, and the layer manifests it may read (``layer_manifests``, from the
    database: ``agents.allowed_manifests``, asked once, on first need)."""

    def __init__(
        self,
        store: ChunkStore,
        image_manifest: str,
        layer_manifests: Callable[[], set[str]],
    ) -> None:
        self.store = store
        self.image = IMAGES.get(store, bytes.fromhex(image_manifest))
        self._ask = layer_manifests
        self._layers: frozenset[str] | None = None

    def layers(self) -> frozenset[str]:
        if self._layers is None:
            self._layers = frozenset(self._ask())
        return self._layers

    def allows(self, cid: bytes) -> bool:
        if cid in self.image:
            return True
        layers = self.layers()
        if cid.hex() in layers:
            return True
        return any(cid in TREES.get(self.store, bytes.fromhex(m)) for m in layers)
