"""The remote store's read path and its disk cache, over the in-memory backend: what is
verified, what is cached, what is evicted, how processes share the cache."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from lamina.errors import CorruptObject, UsageError
from lamina.store import MemoryBackend, chunk_id, codec
from lamina.store.diskcache import DiskChunkCache
from lamina.store.index import Index
from lamina.store.location import parse_size, parse_store_url, resolve
from lamina.store.remote import RemoteChunkStore


class CountingBackend(MemoryBackend):
    """Counts reads; each takes ``delay`` seconds, as a GET over a network would."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.reads = 0

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        self.reads += 1
        time.sleep(self.delay)
        return super().read(name, offset, length)


def remote(tmp_path: Path, capacity: int = 1 << 30, delay: float = 0.0) -> RemoteChunkStore:
    return RemoteChunkStore(
        CountingBackend(delay), Index(None), DiskChunkCache(tmp_path / "cache", capacity)
    )


def fill(store: RemoteChunkStore, n: int, size: int = 64 << 10) -> list[tuple[bytes, bytes]]:
    chunks = [os.urandom(size) for _ in range(n)]
    with store.writer() as w:
        ids = [w.put(c).chunk_id for c in chunks]
    return list(zip(ids, chunks, strict=True))


def corrupt(store: RemoteChunkStore, cid: bytes) -> None:
    backend = store.backend
    assert isinstance(backend, MemoryBackend)
    loc = store.locate(cid)
    body = bytearray(backend.objects[loc.pack])
    body[loc.offset + loc.size - 1] ^= 1
    backend.objects[loc.pack] = bytes(body)


def test_reads_are_verified_cached_and_then_served_from_disk(tmp_path: Path) -> None:
    store = remote(tmp_path)
    chunks = fill(store, 6)  # 64 KiB each: all within one read-ahead window
    bad = chunks[2][0]
    corrupt(store, bad)
    backend = store.backend
    assert isinstance(backend, CountingBackend)
    assert store.get(chunks[0][0]) == chunks[0][1] and backend.reads == 1
    for cid, data in chunks:
        if cid != bad:  # came with the first GET, checked, cached
            assert store.get(cid) == data and store.get_envelope(cid)
    assert backend.reads == 1
    for _ in range(2):  # not cached: the bucket is asked again, and fails again
        with pytest.raises(CorruptObject):
            store.get(bad)
    assert backend.reads == 3
    assert bad not in store.cache and len(store.cache) == 5


def test_read_ahead_stops_at_its_span_and_at_cached_chunks(tmp_path: Path) -> None:
    store = remote(tmp_path)
    chunks = fill(store, 8, size=256 << 10)  # random: envelopes of 256 KiB + 48 bytes
    backend = store.backend
    assert isinstance(backend, CountingBackend)
    store.get(chunks[4][0])  # with 5 and 6: a fourth would pass 1 MiB
    store.get(chunks[0][0])  # with 1 and 2
    store.get(chunks[3][0])  # alone: 4 is cached
    assert backend.reads == 3
    assert [store.get(c) for c, _ in chunks] == [d for _, d in chunks]
    assert backend.reads == 4  # 7 was never fetched before


def test_a_corrupt_cache_entry_is_dropped_and_fetched_again(tmp_path: Path) -> None:
    store = remote(tmp_path)
    [(cid, data)] = fill(store, 1)
    store.get(cid)
    [segment] = (tmp_path / "cache").glob("*.seg")
    body = bytearray(segment.read_bytes())
    body[-1] ^= 1
    segment.write_bytes(body)
    backend = store.backend
    assert isinstance(backend, CountingBackend)
    assert store.get(cid) == data and backend.reads == 2


def _where(store: RemoteChunkStore, cid: bytes) -> tuple[str, int, int]:
    loc = store.locate(cid)
    return loc.pack, loc.offset, loc.size


class RepackingBackend(MemoryBackend):
    """Moves a pack to a new name (as gc's repacking does) just before its first read."""

    def __init__(self) -> None:
        super().__init__()
        self.store: RemoteChunkStore | None = None

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        store = self.store
        if store is not None and name.endswith(".pack") and not name.startswith("packs/zz"):
            self.store = None
            moved = "packs/zz/moved.pack"
            self.objects[moved] = self.objects.pop(name)
            store.index.add_pack(moved, len(self.objects[moved]), [])
            store.index.move((c, moved, o) for c, o in store.index.chunks_in(name).items())
            store.index.remove_pack(name)
        return super().read(name, offset, length)


def test_a_pack_repacked_under_a_read_is_read_where_it_went(tmp_path: Path) -> None:
    backend = RepackingBackend()
    store = RemoteChunkStore(backend, Index(None), DiskChunkCache(tmp_path / "cache", 1 << 30))
    [(cid, data), (other, more)] = fill(store, 2)
    backend.store = store
    assert store.get(cid) == data and store.get(other) == more
    assert list(backend.objects) == ["packs/zz/moved.pack"]


def test_concurrent_misses_fetch_a_chunk_once(tmp_path: Path) -> None:
    store = remote(tmp_path, delay=0.2)
    [(cid, data)] = fill(store, 1)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(store.get(cid))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backend = store.backend
    assert isinstance(backend, CountingBackend)
    assert results == [data] * 8 and backend.reads == 1


def envelope(i: int, size: int = 100_000) -> tuple[bytes, bytes]:
    """(id, envelope) of a chunk of random bytes."""
    data = os.urandom(size)
    cid = chunk_id(data)
    return cid, codec.encode(data, cid)


def segment_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*.seg"))


def test_eviction_keeps_what_is_read_and_the_bound(tmp_path: Path) -> None:
    cache = DiskChunkCache(tmp_path / "cache", capacity=4 << 20)  # 4 segments of 1 MiB
    entries = [envelope(i) for i in range(100)]
    for i, (cid, env) in enumerate(entries):
        cache.put(cid, env)
        if i < 10 or i % 10 == 0:  # read again and again: hot
            for hot_id, _ in entries[: min(i + 1, 10)]:
                assert cache.get(hot_id) is not None
        assert cache.used == segment_bytes(tmp_path / "cache") <= cache.capacity
    assert all(cache.get(cid) == env for cid, env in entries[:10])  # kept by use
    cold = [cid for cid, _ in entries[10:60] if cache.get(cid) is not None]
    assert not cold  # old and never read: evicted
    assert cache.get(entries[-1][0]) == entries[-1][1]  # the newest are there


def test_the_next_owner_finds_the_entries_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = DiskChunkCache(root, capacity=64 << 20)
    entries = [envelope(i) for i in range(5)]
    for cid, env in entries:
        cache.put(cid, env)
    cache.close()
    [segment] = root.glob("*.seg")
    with open(segment, "ab") as f:
        f.write(entries[0][1][:5000])  # a write cut short by a crash
    again = DiskChunkCache(root, capacity=64 << 20)
    assert all(again.get(cid) == env for cid, env in entries)
    assert segment.stat().st_size == sum(len(e) for _, e in entries)
    again.close()
    smaller = DiskChunkCache(root, capacity=2 << 20)  # trims to its bound when it loads
    assert smaller.claim() and smaller.used <= 2 << 20 and segment_bytes(root) <= 2 << 20


def test_processes_share_the_cache_and_its_bound(tmp_path: Path) -> None:
    """Two openings of one cache (as two processes of a home): each finds what the other
    added, a hit in one keeps an entry through the other's eviction, and the segment
    files never pass the bound however the two interleave."""
    root = tmp_path / "cache"
    one, two = DiskChunkCache(root, 4 << 20), DiskChunkCache(root, 4 << 20)
    (a, env_a), (b, env_b), (c, env_c) = envelope(1), envelope(2), envelope(3)
    one.put(a, env_a)
    two.put(b, env_b)
    one.put(c, env_c)
    # found on a miss, without a message; `one` marks b used, `two` marks a (in the
    # segment's usage file: the other process sees it when it evicts)
    assert two.get(a) == env_a and one.get(b) == env_b
    for i in range(4, 80):
        cid, env = envelope(i)
        (one if i % 2 else two).put(cid, env)
        assert segment_bytes(root) <= 4 << 20
    assert one.get(a) == env_a and two.get(b) == env_b  # kept by a second chance
    assert one.get(c) is None and two.get(c) is None  # never read since written: evicted
    assert not [p for p in root.glob("*.use") if not p.with_suffix(".seg").exists()]
    one.close()
    two.close()


_WORKER = """
import os, sys
from pathlib import Path
from lamina.store import chunk_id, codec
from lamina.store.diskcache import DiskChunkCache
cache = DiskChunkCache(Path(sys.argv[1]), 6 << 20)
seen = 0
for i in range(150):
    data = os.urandom(100_000)
    cid = chunk_id(data)
    cache.put(cid, codec.encode(data, cid))
    for other in list(cache._places)[:20]:
        env = cache.get(other)
        if env is not None:
            assert codec.decode(env, expected=other), "a wrong envelope"
            seen += 1
print(seen)
"""


def test_worker_processes_write_one_cache_at_once(tmp_path: Path) -> None:
    """Three real processes adding and reading at once: every envelope left in the
    segments is whole and checks against its id, and the bound holds."""
    import subprocess
    import sys

    root = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and all(int(o) > 0 for o in outs)
    assert segment_bytes(root) <= 6 << 20
    cache = DiskChunkCache(root, 6 << 20)
    assert cache.claim() and len(cache) > 20
    for cid in list(cache._places):
        envelope_bytes = cache.get(cid)
        assert envelope_bytes is not None
        codec.decode(envelope_bytes, expected=cid)
    assert cache.used == segment_bytes(root)


def test_store_urls_and_sizes_are_checked() -> None:
    assert parse_store_url("s3://bucket//a/b/") == "s3://bucket/a/b"
    for bad in ("file:///x", "s3://", "s3://Bad_Bucket", "s3://bucket/../x"):
        with pytest.raises(UsageError):
            parse_store_url(bad)
    assert parse_size("8G", "X") == 8 << 30 and parse_size("512MiB", "X") == 512 << 20
    assert parse_size("1000", "X") == 1000
    with pytest.raises(UsageError):
        parse_size("lots", "X")


def test_the_first_choice_is_recorded_and_kept(tmp_path: Path) -> None:
    env = {"LAMINA_STORE_URL": "s3://bucket/p", "LAMINA_S3_ENDPOINT_URL": "http://a:1"}
    first = resolve(tmp_path, env["LAMINA_STORE_URL"], env["LAMINA_S3_ENDPOINT_URL"])
    assert (first.bucket, first.prefix, first.endpoint_url) == ("bucket", "p", "http://a:1")
    assert resolve(tmp_path, None, None) == first  # no variable: the record
    moved = resolve(tmp_path, None, "http://b:2")
    assert moved.url == first.url and moved.endpoint_url == "http://b:2"
    with pytest.raises(UsageError, match="keeps its chunks in s3://bucket/p"):
        resolve(tmp_path, "s3://bucket/q", None)
    assert resolve(tmp_path / "other", None, None).is_local
    with pytest.raises(UsageError, match="its local store"):
        resolve(tmp_path / "other", env["LAMINA_STORE_URL"], None)
