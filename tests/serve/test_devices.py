"""Deltas and machine devices against a plain bytearray model (no sockets)."""

from __future__ import annotations

import array
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.delta.device import MachineDevice
from lamina.delta.file import BLOCK, ZERO, Delta, _scan, delta_usage, discard
from lamina.errors import Conflict
from lamina.image import ImageReader, Manifest
from lamina.image.device import ImageDevice
from lamina.nbd import ExportInfo
from lamina.store import ChunkCache, ChunkStore

SIZE = 64 * 1024 + 3 * 512  # not a multiple of the 4 KiB block: the last block is short
CHUNK = 16 * 1024


def base_image(store: ChunkStore) -> tuple[Manifest, bytes, bytes]:
    data = bytearray(os.urandom(SIZE))
    data[16 * 1024 : 32 * 1024] = bytes(16 * 1024)  # one zero chunk
    table = b""
    with store.writer() as w:
        for i in range(0, SIZE, CHUNK):
            table += w.put(bytes(data[i : i + CHUNK])).chunk_id
        manifest = Manifest(SIZE, CHUNK, table)
        mid = w.put(manifest.to_bytes()).chunk_id
    return manifest, mid, bytes(data)


def machine(store: ChunkStore, manifest: Manifest, mid: bytes, where: Path) -> MachineDevice:
    info = ExportInfo("machine/t", SIZE, read_only=False)
    base = ImageDevice(info, ImageReader(store, manifest, ChunkCache(1 << 20)))
    return MachineDevice(info, base, Delta(where, size=SIZE, base_id=mid))


def read_all(dev: MachineDevice) -> bytes:
    return b"".join(dev.read(0, SIZE))


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "flush", "reopen"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 12000),
        st.integers(0, 255),
    ),
    max_size=25,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops)
def test_machine_device_matches_a_bytearray(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int, int, int]]
) -> None:
    tmp = tmp_path_factory.mktemp("dev")
    store = ChunkStore.in_memory()
    manifest, mid, data = base_image(store)
    model = bytearray(data)
    dev = machine(store, manifest, mid, tmp / "delta")
    try:
        for op, offset, wanted, byte in steps:
            length = min(wanted, SIZE - offset)
            if op == "write":
                dev.write(offset, bytes([byte]) * length, fua=byte % 2 == 0)
                model[offset : offset + length] = bytes([byte]) * length
            elif op == "zero":
                dev.write_zeroes(offset, length, fua=False)
                model[offset : offset + length] = bytes(length)
            elif op == "flush":
                dev.flush()
            else:
                dev.close()
                dev = machine(store, manifest, mid, tmp / "delta")
            assert b"".join(dev.read(offset, length)) == model[offset : offset + length]
        assert read_all(dev) == bytes(model)
        extents = dev.extents(0, SIZE)
        assert sum(n for n, _ in extents) == SIZE
    finally:
        dev.close()


def test_untouched_reads_come_from_the_image(tmp_path: Path) -> None:
    store = ChunkStore.in_memory()
    manifest, mid, data = base_image(store)
    dev = machine(store, manifest, mid, tmp_path / "d")
    assert read_all(dev) == data
    dev.write(5000, b"hello", fua=True)
    assert delta_usage(tmp_path / "d")[0] == 1  # one 4 KiB block in the delta
    dev.close()


def test_delta_is_exclusive_and_reset_refused_while_open(tmp_path: Path) -> None:
    store = ChunkStore.in_memory()
    manifest, mid, _ = base_image(store)
    dev = machine(store, manifest, mid, tmp_path / "d")
    with pytest.raises(Conflict):
        Delta(tmp_path / "d", size=SIZE, base_id=mid)
    with pytest.raises(Conflict):
        discard(tmp_path / "d")
    dev.close()
    discard(tmp_path / "d")
    assert delta_usage(tmp_path / "d") == (0, 0)


def test_delta_of_another_version_is_refused(tmp_path: Path) -> None:
    store = ChunkStore.in_memory()
    manifest, mid, _ = base_image(store)
    machine(store, manifest, mid, tmp_path / "d").close()
    with pytest.raises(Conflict):
        Delta(tmp_path / "d", size=SIZE, base_id=bytes(32))


def test_slot_written_without_its_map_entry_is_reused(tmp_path: Path) -> None:
    """A crash between the data write and the map store leaves an orphan slot."""
    store = ChunkStore.in_memory()
    manifest, mid, _ = base_image(store)
    dev = machine(store, manifest, mid, tmp_path / "d")
    dev.write(0, b"a" * BLOCK, fua=True)
    dev.close()
    with open(tmp_path / "d" / "delta.data", "ab") as f:
        f.write(b"orphan" * 1000)  # as if a second block's data landed, not its map entry
    dev = machine(store, manifest, mid, tmp_path / "d")
    dev.write(BLOCK, b"b" * BLOCK, fua=True)
    assert b"".join(dev.read(0, 2 * BLOCK)) == b"a" * BLOCK + b"b" * BLOCK
    dev.close()


def test_a_write_during_a_flush_is_synced_by_the_next_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUSH runs on a worker thread while writes go on: the next FLUSH must still sync."""
    import threading

    import lamina.delta.file as delta_module

    delta = Delta(tmp_path / "d", size=1 << 20, base_id=bytes(32))
    calls: list[int] = []
    real = os.fdatasync
    in_sync, release = threading.Event(), threading.Event()

    def slow(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            in_sync.set()
            release.wait(5)
        real(fd)

    monkeypatch.setattr(delta_module.os, "fdatasync", slow)
    delta.write_blocks(0, b"a" * BLOCK)
    first = threading.Thread(target=delta.flush)
    first.start()
    assert in_sync.wait(5)
    delta.write_blocks(1, b"b" * BLOCK)  # lands while the first flush is syncing
    release.set()
    first.join()
    data_fd = calls[0]  # the data file is synced first, then the map
    before = calls.count(data_fd)
    delta.flush()
    assert calls.count(data_fd) == before + 1  # the second FLUSH synced again
    assert calls[-2:] == [data_fd, calls[-1]] and calls[-1] != data_fd  # then the map
    synced = len(calls)
    delta.flush()
    assert len(calls) == synced  # nothing new: no needless sync
    delta.close()


@settings(max_examples=60, deadline=None)
@given(
    entries=st.dictionaries(
        st.integers(0, 40_000),
        st.one_of(st.integers(1, 2**32 - 2), st.just(ZERO)),
        max_size=40,
    ),
    length=st.integers(1, 40_001),
)
def test_map_scan_counts_and_finds_the_highest_slot(entries: dict[int, int], length: int) -> None:
    """The windowed scan of a reopened delta's map against a plain loop: entries on both
    sides of a window's edge, zeroed blocks (not slots) above every slot."""
    table = array.array("I", bytes(4 * length))
    for index, value in entries.items():
        if index < length:
            table[index] = value
    slots = [v for v in table if v not in (0, ZERO)]
    used = sum(1 for v in table if v)
    assert _scan(memoryview(table)) == (used, max(slots, default=0))
