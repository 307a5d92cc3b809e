"""The remote store's read path and its disk cache, over the in-memory backend: what is
verified, what is cached, what is evicted, who may write the cache."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from lamina.errors import CorruptObject, UsageError
from lamina.store import MemoryBackend
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
    (cid, data), (bad, _) = fill(store, 2)
    backend = store.backend
    assert isinstance(backend, CountingBackend)
    assert store.get(cid) == data and backend.reads == 1
    assert store.get(cid) == data and store.get_envelope(cid) and backend.reads == 1
    corrupt(store, bad)
    for _ in range(2):  # not cached: the bucket is asked again, and fails again
        with pytest.raises(CorruptObject):
            store.get(bad)
    assert backend.reads == 3
    assert len(store.cache) == 1 and store.cache.get(bad) is None


def test_a_corrupt_cache_file_is_dropped_and_fetched_again(tmp_path: Path) -> None:
    store = remote(tmp_path)
    [(cid, data)] = fill(store, 1)
    store.get(cid)
    [path] = (tmp_path / "cache").rglob("*.env")
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    assert store.get(cid) == data
    assert store.cache.get(cid) == store.backend.read(*_where(store, cid))


def _where(store: RemoteChunkStore, cid: bytes) -> tuple[str, int, int]:
    loc = store.locate(cid)
    return loc.pack, loc.offset, loc.size


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


def test_the_least_recently_used_are_evicted_within_the_bound(tmp_path: Path) -> None:
    store = remote(tmp_path, capacity=5 * (64 << 10) + 5 * 4096)
    chunks = fill(store, 8)
    # 20 ms apart: use order is kept in mtimes, whose clock ticks every few ms
    for i in (0, 1, 2, 3, 4, 0, 5):  # chunk 0 is read again: 1 is now the least recent
        store.get(chunks[i][0])
        time.sleep(0.02)
    cached = {p.name.removesuffix(".env") for p in (tmp_path / "cache").rglob("*.env")}
    assert cached == {c.hex() for c, _ in [chunks[i] for i in (0, 2, 3, 4, 5)]}
    assert store.cache.used <= store.cache.capacity

    # the next owner starts from the files, in their use order, and trims to its bound
    store.cache.close()
    smaller = DiskChunkCache(tmp_path / "cache", capacity=2 * (64 << 10) + 2 * 4096)
    smaller.put(chunks[6][0], store.backend.read(*_where(store, chunks[6][0])))
    cached = {p.name.removesuffix(".env") for p in (tmp_path / "cache").rglob("*.env")}
    assert cached == {chunks[5][0].hex(), chunks[6][0].hex()}


def test_only_one_process_writes_the_cache(tmp_path: Path) -> None:
    owner = DiskChunkCache(tmp_path / "cache", 1 << 20)
    other = DiskChunkCache(tmp_path / "cache", 1 << 20)
    envelope = b"x" * 1000
    owner.put(b"\1" * 32, envelope)
    other.put(b"\2" * 32, envelope)  # refused: the owner holds the lock
    assert owner.owner and not other.owner
    assert other.get(b"\1" * 32) == envelope and other.get(b"\2" * 32) is None
    owner.close()
    other._next_claim = 0.0  # skip the retry delay
    other.put(b"\2" * 32, envelope)
    assert other.owner and len(other) == 2


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
    first = resolve(tmp_path, env)
    assert (first.bucket, first.prefix, first.endpoint_url) == ("bucket", "p", "http://a:1")
    assert resolve(tmp_path, {}) == first  # no variable: the record
    moved = resolve(tmp_path, {"LAMINA_S3_ENDPOINT_URL": "http://b:2"})
    assert moved.url == first.url and moved.endpoint_url == "http://b:2"
    with pytest.raises(UsageError, match="keeps its chunks in s3://bucket/p"):
        resolve(tmp_path, {"LAMINA_STORE_URL": "s3://bucket/q"})
    assert resolve(tmp_path / "other", {}).is_local
    with pytest.raises(UsageError, match="its local store"):
        resolve(tmp_path / "other", env)
