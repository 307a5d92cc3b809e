from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from lamina.errors import NotFound, StoreBusy, StoreError
from lamina.store import ZERO_ID, ChunkStore, chunk_id
from lamina.store.backends import LocalBackend


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ChunkStore:
    if request.param == "memory":
        return ChunkStore.in_memory()
    return ChunkStore.open_local(tmp_path / "store")


def test_put_get_dedup_and_zero(store: ChunkStore) -> None:
    a, b = os.urandom(10000), b"b" * 10000
    with store.writer() as w:
        ra = w.put(a)
        assert ra.new and ra.chunk_id == chunk_id(a)
        assert not w.put(a).new  # pending in the same pack
        rb = w.put(b)
        zero = w.put(bytes(4096))
        assert zero.chunk_id == ZERO_ID and not zero.new and zero.stored == 0
    assert store.get(ra.chunk_id) == a and store.get(rb.chunk_id) == b
    with store.writer() as w:
        assert not w.put(a).new
    assert store.usage().chunks == 2
    with pytest.raises(NotFound):
        store.get(chunk_id(b"absent"))


def test_gc_keeps_live_and_removes_dead(store: ChunkStore) -> None:
    blobs = [os.urandom(50000) for _ in range(20)]
    with store.writer() as w:
        ids = [w.put(b).chunk_id for b in blobs]
    live = set(ids[:5])
    report = store.gc(lambda: live)
    assert report.chunks_removed == 15
    assert report.packs_rewritten == 1  # 25% live: rewritten
    for cid, blob in zip(ids[:5], blobs[:5], strict=True):
        assert store.get(cid) == blob
    for cid in ids[5:]:
        assert not store.has(cid)
    assert store.verify().ok
    assert store.gc(set).chunks_removed == 5
    assert store.usage().packs == 0


def test_packs_rebuild_a_lost_index(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ChunkStore.open_local(root)
    with store.writer() as w:
        cid = w.put(os.urandom(1000)).chunk_id
    store.close()
    for p in root.glob("index.sqlite*"):
        p.unlink()
    again = ChunkStore.open_local(root)
    assert again.get(cid)  # index rebuilt from the pack's trailer on a miss


def test_verify_names_the_corrupt_chunk_for_any_flipped_byte(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ChunkStore.open_local(root)
    with store.writer() as w:
        ids = [w.put(os.urandom(3000) if i % 2 else b"z%d" % i * 500).chunk_id for i in range(6)]
    store.close()
    pack = next(root.glob("packs/*/*.pack"))
    original = pack.read_bytes()
    rng = random.Random(7)
    positions = sorted(
        {0, 5, len(original) - 1, len(original) - 30, *rng.sample(range(len(original)), 60)}
    )
    for pos in positions:
        work = tmp_path / f"copy{pos}"
        shutil.copytree(root, work)
        target = next(work.glob("packs/*/*.pack"))
        data = bytearray(original)
        data[pos] ^= 0x01
        target.write_bytes(bytes(data))
        copy = ChunkStore.open_local(work)
        report = copy.verify()
        assert not report.ok, f"flip at {pos} of {len(original)} went unnoticed"
        copy.close()
        shutil.rmtree(work)
    # a flip inside a chunk's payload names that chunk
    data = bytearray(original)
    data[60] ^= 0x01
    pack.write_bytes(bytes(data))
    report = ChunkStore.open_local(root).verify()
    assert [c for c, _ in report.corrupt] == [ids[0].hex()]


def test_gc_waits_for_writers(tmp_path: Path) -> None:
    store = ChunkStore.open_local(tmp_path / "s")
    other = ChunkStore.open_local(tmp_path / "s")
    with store.writer(), pytest.raises(StoreBusy):
        other.gc(set, timeout=0.2)


def test_local_backend_put_is_atomic_and_lists_no_temporaries(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    (tmp_path / "packs").mkdir()
    (tmp_path / "packs" / ".x.pack.1.2.tmp").write_bytes(b"half")
    backend.put("packs/a.pack", [b"who", b"le"])
    assert list(backend.list("packs/")) == ["packs/a.pack"]
    assert backend.read("packs/a.pack", 1, 3) == b"hol"


def test_large_packs_take_the_direct_path_and_read_back(tmp_path: Path) -> None:
    store = ChunkStore.open_local(tmp_path / "s")
    blobs = [os.urandom(256 << 10) for _ in range(12)]  # 3 MiB: above the O_DIRECT floor
    with store.writer() as w:
        ids = [w.put(b).chunk_id for b in blobs]
    pack = next((tmp_path / "s").glob("packs/*/*.pack"))
    assert pack.stat().st_size % 4096 == 0
    assert [store.get(c) for c in ids] == blobs
    assert store.verify().ok


def test_gc_copies_only_live_chunks_and_stops_at_a_corrupt_one(tmp_path: Path) -> None:
    for live, ok in ((0, False), (1, True)):
        root = tmp_path / f"store{live}"
        store = ChunkStore.open_local(root)
        with store.writer() as w:
            ids = [w.put(os.urandom(3000)).chunk_id for _ in range(6)]
        pack = next(root.glob("packs/*/*.pack"))
        data = bytearray(pack.read_bytes())
        data[60] ^= 0x01  # inside the first chunk's payload
        pack.write_bytes(bytes(data))
        # 1 of 6 chunks live: the pack is rewritten
        if ok:  # the damaged chunk is dead: neither copied nor in the way
            store.gc(lambda: {ids[live]})  # noqa: B023
            assert store.get(ids[live]) and not pack.exists()
        else:  # the damaged chunk is live: gc stops and the pack stays
            with pytest.raises(StoreError, match="gc stopped"):
                store.gc(lambda: {ids[live]})  # noqa: B023
            assert pack.read_bytes() == bytes(data)
            assert list(root.glob("packs/*/*.pack")) == [pack]
        store.close()
