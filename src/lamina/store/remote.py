"""The chunk store over a remote backend (an S3 bucket): a disk cache in front of the
ranged GETs, every envelope from the bucket checked against its id before use, and an
index rebuilt from the packs' trailers in parallel.

A chunk that fails its check raises CorruptObject, is not cached and is never returned;
the next read goes to the bucket again (a transient fault heals, a corrupt pack does not).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, Protocol, runtime_checkable

from lamina.errors import CorruptObject
from lamina.store import codec
from lamina.store.backends.base import Backend
from lamina.store.diskcache import DiskChunkCache
from lamina.store.index import Index
from lamina.store.pack import Entry, read_trailer
from lamina.store.store import ChunkStore

# Trailers are read with this many GETs in flight when a fresh home indexes a bucket.
REINDEX_THREADS: Final = 8
# One GET of a pack's last 64 KiB holds footer and trailer together for packs of up to
# ~1,500 chunks; a 32 MiB pack of 256 KiB chunks has at most 130.
_TAIL: Final = 64 << 10


@runtime_checkable
class Listing(Protocol):
    def list_sizes(self, prefix: str = "") -> Iterable[tuple[str, int]]: ...


class RemoteChunkStore(ChunkStore):
    def __init__(self, backend: Backend, index: Index, cache: DiskChunkCache) -> None:
        super().__init__(backend, index)
        self.cache = cache
        self._loading: dict[bytes, Future[tuple[bytes, bytes]]] = {}
        self._loading_lock = threading.Lock()

    def close(self) -> None:
        super().close()
        self.cache.close()

    def get(self, cid: bytes, verify: bool = True) -> bytes:
        """The plaintext of a chunk; the zero id reads as an empty bytes (caller pads).
        Everything is verified, ``verify`` or not: bytes from afar are not trusted."""
        if cid == codec.ZERO_ID:
            return b""
        return self._load(cid)[1]

    def get_envelope(self, cid: bytes) -> bytes:
        return self._load(cid)[0]

    def _load(self, cid: bytes) -> tuple[bytes, bytes]:
        """(envelope, plaintext), checked against the id: from the disk cache, else
        fetched once however many threads ask at the same time (a boot storm reads the
        same chunks)."""
        cached = self.cache.get(cid)
        if cached is not None:
            try:
                return cached, codec.decode(cached, expected=cid)
            except CorruptObject:
                self.cache.discard(cid)  # the local disk lied: fetch it again
        with self._loading_lock:
            pending = self._loading.get(cid)
            mine = pending is None
            if pending is None:
                pending = self._loading[cid] = Future()
        if not mine:
            return pending.result()
        try:
            envelope = super().get_envelope(cid)
            loaded = envelope, codec.decode(envelope, expected=cid)
            self.cache.put(cid, envelope)
            pending.set_result(loaded)
            return loaded
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            with self._loading_lock:
                del self._loading[cid]

    def reconcile(self) -> int:
        """Index the packs the index does not know, reading their trailers in parallel
        (one GET each, from the listing's sizes); forget packs that are gone."""
        if not isinstance(self.backend, Listing):
            return super().reconcile()
        lister: Listing = self.backend
        known = self.index.packs()
        present = dict(lister.list_sizes("packs/"))
        new = sorted(present.keys() - known.keys())
        with ThreadPoolExecutor(REINDEX_THREADS, thread_name_prefix="reindex") as pool:
            trailers = pool.map(lambda n: self._trailer(n, present[n]), new)
            for name, entries in zip(new, trailers, strict=True):
                self.index.add_pack(name, present[name], entries)
        gone = known.keys() - present.keys()
        for name in gone:
            self.index.remove_pack(name)
        return len(new) + len(gone)

    def _trailer(self, name: str, size: int) -> list[Entry]:
        start = max(0, size - _TAIL)
        tail = self.backend.read(name, start, size - start)

        def read(offset: int, length: int) -> bytes:
            if offset >= start:
                return tail[offset - start : offset - start + length]
            return self.backend.read(name, offset, length)

        return read_trailer(read, size, name)
