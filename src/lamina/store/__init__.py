"""Content-addressed chunk store: chunk -> BLAKE3 id -> zstd -> envelope -> pack -> backend."""

from lamina.store.backends import Backend, LocalBackend, MemoryBackend
from lamina.store.cache import ChunkCache
from lamina.store.codec import ZERO_ID, chunk_id
from lamina.store.index import Location
from lamina.store.store import ChunkStore, GcReport, PutResult, Usage, VerifyReport, Writer

__all__ = [
    "ZERO_ID",
    "Backend",
    "ChunkCache",
    "ChunkStore",
    "GcReport",
    "LocalBackend",
    "Location",
    "MemoryBackend",
    "PutResult",
    "Usage",
    "VerifyReport",
    "Writer",
    "chunk_id",
]
