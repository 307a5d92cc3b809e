"""Content-addressed chunk store: chunk -> BLAKE3 id -> zstd -> envelope -> pack -> backend.

codec.py     chunk ids, compression and the versioned object envelope
chunker.py   fixed-size chunks for disk images, content-defined ones for files
pack.py      pack files: many envelopes in one immutable object, with a trailer
index.py     where each chunk lives: chunk id -> (pack, offset, size), in SQLite
store.py     ChunkStore: put/get/has, dedup, verify, gc
cache.py     a byte-bounded LRU of decompressed chunks, shared in a process
location.py  where a home's store lives (its folder, or s3://), recorded in the home
remote.py    the store over a remote backend: checked ranged GETs behind a disk cache
diskcache.py  a bounded disk cache of chunk envelopes, for remote packs
leases.py    several homes on one bucket: import leases, condemn-then-delete gc
backends/    where the packs live: a local directory, or memory for tests
"""

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
