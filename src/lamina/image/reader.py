"""Reading byte ranges of an image version through a shared chunk cache."""

from __future__ import annotations

from lamina.errors import InvalidInput
from lamina.image.manifest import Manifest
from lamina.store import ZERO_ID, ChunkCache, ChunkStore


class ImageReader:
    """Random access to one image version. ``segments`` returns views, not copies, so a
    large read can go to a socket with one ``sendmsg``."""

    def __init__(
        self, store: ChunkStore, manifest: Manifest, cache: ChunkCache | None = None
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.cache = cache if cache is not None else ChunkCache(64 << 20)
        self._zeros = memoryview(bytes(manifest.chunk_size))

    @property
    def size(self) -> int:
        return self.manifest.size

    def chunk(self, index: int) -> memoryview:
        """The whole plaintext of chunk ``index`` (zeros for an unstored chunk)."""
        cid = self.manifest.id_at(index)
        n = self.manifest.chunk_len(index)
        if cid == ZERO_ID:
            return self._zeros[:n]
        return memoryview(self.cache.get(cid, self.store.get))[:n]

    def segments(self, offset: int, length: int) -> list[memoryview]:
        if offset < 0 or length < 0 or offset + length > self.manifest.size:
            raise InvalidInput(f"read of {length} bytes at {offset} is outside the image")
        return [
            self.chunk(i)[within : within + n]
            for i, within, n in self.manifest.spans(offset, length)
        ]

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(self.segments(offset, length))

    def is_zero(self, index: int) -> bool:
        return self.manifest.id_at(index) == ZERO_ID
