"""The chunk store over a remote backend (an S3 bucket): a disk cache in front of the
ranged GETs, every envelope from the bucket checked against its id before use, and an
index rebuilt from the packs' trailers in parallel.

A chunk that fails its check raises CorruptObject, is not cached and is never returned;
the next read goes to the bucket again (a transient fault heals, a corrupt pack does not).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, Protocol, runtime_checkable

from lamina.errors import CorruptObject
from lamina.store import codec
from lamina.store.backends.base import Backend
from lamina.store.diskcache import DiskChunkCache
from lamina.store.index import Index, Location
from lamina.store.pack import Entry, read_trailer
from lamina.store.store import ChunkStore

# Trailers are read with this many GETs in flight when a fresh home indexes a bucket.
REINDEX_THREADS: Final = 8
# A miss fetches the chunks that follow it in its pack too, up to this much in one ranged
# GET. Chunks are packed in image order, and boots read close together: a demo VM's boot
# touched 25.0% of its image in 256 KiB chunks and 29.7% in 1 MiB ones (docs/design.md, "Chunk
# size"), so a window of 1 MiB costs a fifth more bytes for a quarter of the requests.
READAHEAD: Final = 1 << 20
_FRESH: Final = 16 << 20  # bytes of decoded neighbours kept in memory
# One GET of a pack's last 64 KiB holds footer and trailer together for packs of up to
# ~1,500 chunks; a 32 MiB pack of 256 KiB chunks has at most 130.
_TAIL: Final = 64 << 10


@runtime_checkable
class Listing(Protocol):
    def list_sizes(self, prefix: str = "") -> Iterable[tuple[str, int]]: ...


Loaded = tuple[bytes, bytes]  # (envelope, plaintext)


class _Retry(Exception):
    """The thread fetching a chunk for others did not get it (its pack was repacked)."""


class RemoteChunkStore(ChunkStore):
    def __init__(self, backend: Backend, index: Index, cache: DiskChunkCache) -> None:
        super().__init__(backend, index)
        self.cache = cache
        self._loading: dict[bytes, Future[Loaded]] = {}
        self._loading_lock = threading.Lock()
        # Neighbours fetched by read-ahead, decoded once: the next request usually wants
        # them, and then they need no second decode from the disk cache.
        self._fresh: OrderedDict[bytes, Loaded] = OrderedDict()
        self._fresh_bytes = 0

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

    def _load(self, cid: bytes) -> Loaded:
        """(envelope, plaintext), checked against the id: from memory or the disk cache,
        else fetched once however many threads ask at the same time (a boot storm reads
        the same chunks), together with the chunks that follow it in its pack."""
        with self._loading_lock:
            fresh = self._fresh.pop(cid, None)
            if fresh is not None:
                self._fresh_bytes -= len(fresh[1])
            pending = self._loading.get(cid)
        if fresh is not None:
            return fresh
        if pending is not None:
            return self._wait(pending, cid)
        cached = self.cache.get(cid)
        if cached is not None:
            try:
                return cached, codec.decode(cached, expected=cid)
            except CorruptObject:
                self.cache.discard(cid)  # the local disk lied: fetch it again
        return self._fetch(cid)

    def _fetch(self, cid: bytes) -> Loaded:
        loc = self.locate(cid)
        window = self._window(cid, loc)
        with self._loading_lock:
            pending = self._loading.get(cid)
            if pending is not None:  # another thread was quicker
                mine: dict[bytes, tuple[Future[Loaded], int, int]] = {}
            else:
                mine = {}
                for c, offset, size in window:
                    if c in self._loading:
                        break  # being fetched by another thread: the window ends here
                    mine[c] = Future(), offset, size
                    self._loading[c] = mine[c][0]
        if pending is not None:
            return self._wait(pending, cid)
        try:
            self._read_window(loc.pack, mine)
            return mine[cid][0].result()
        except FileNotFoundError:  # repacked by gc meanwhile: read it where it is now
            envelope = super().get_envelope(cid)
            loaded = envelope, codec.decode(envelope, expected=cid)
            self.cache.put(cid, envelope)
            return loaded
        finally:
            with self._loading_lock:
                for c, (future, _, _) in mine.items():
                    del self._loading[c]
                    if not future.done():
                        future.set_exception(_Retry())

    def _wait(self, pending: Future[Loaded], cid: bytes) -> Loaded:
        try:
            return pending.result()
        except _Retry:
            return self._load(cid)

    def _window(self, cid: bytes, loc: Location) -> list[tuple[bytes, int, int]]:
        """``cid`` and the chunks after it in its pack that are not cached, within
        READAHEAD bytes of one ranged GET."""
        window = [(cid, loc.offset, loc.size)]
        if loc.size >= READAHEAD:
            return window
        for c, offset, size in self.index.following(loc.pack, loc.offset, READAHEAD):
            if c == cid:
                continue
            if offset + size > loc.offset + READAHEAD or c in self.cache:
                break
            window.append((c, offset, size))
        return window

    def _read_window(self, pack: str, mine: dict[bytes, tuple[Future[Loaded], int, int]]) -> None:
        """One GET for the window; each envelope checked, cached and handed to its
        waiters, or its CorruptObject handed to them (and nothing cached)."""
        start = min(offset for _, offset, _ in mine.values())
        end = max(offset + size for _, offset, size in mine.values())
        try:
            data = self.backend.read(pack, start, end - start)
        except FileNotFoundError:
            raise  # the waiters retry
        except BaseException as exc:
            for future, _, _ in mine.values():
                future.set_exception(exc)
            raise
        first = True
        for c, (future, offset, size) in mine.items():
            envelope = data[offset - start : offset - start + size]
            try:
                loaded = envelope, codec.decode(envelope, expected=c)
            except CorruptObject as exc:
                future.set_exception(exc)
            else:
                self.cache.put(c, envelope)
                future.set_result(loaded)
                if not first:
                    self._remember(c, loaded)
            first = False

    def _remember(self, cid: bytes, loaded: Loaded) -> None:
        with self._loading_lock:
            if cid in self._fresh:
                return
            self._fresh[cid] = loaded
            self._fresh_bytes += len(loaded[1])
            while self._fresh_bytes > _FRESH:
                _, dropped = self._fresh.popitem(last=False)
                self._fresh_bytes -= len(dropped[1])

    def reconcile(self) -> int:
        """Index the packs the index does not know, reading their trailers in parallel
        (one GET each, from the listing's sizes); forget packs that are gone."""
        if not isinstance(self.backend, Listing):
            return super().reconcile()
        lister: Listing = self.backend
        known = self.index.packs()
        present = dict(lister.list_sizes("packs/"))
        # Gone first: a chunk repacked by another home's gc is then indexed in its new pack.
        gone = known.keys() - present.keys()
        for name in gone:
            self.index.remove_pack(name)
        new = sorted(present.keys() - known.keys())
        with ThreadPoolExecutor(REINDEX_THREADS, thread_name_prefix="reindex") as pool:
            trailers = pool.map(lambda n: self._trailer(n, present[n]), new)
            for name, entries in zip(new, trailers, strict=True):
                self.index_pack(name, present[name], entries)
        return len(new) + len(gone)

    def _trailer(self, name: str, size: int) -> list[Entry]:
        start = max(0, size - _TAIL)
        tail = self.backend.read(name, start, size - start)

        def read(offset: int, length: int) -> bytes:
            if offset >= start:
                return tail[offset - start : offset - start + length]
            return self.backend.read(name, offset, length)

        return read_trailer(read, size, name)
