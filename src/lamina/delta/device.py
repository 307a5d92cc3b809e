"""A machine's disk as a block device: its pinned image version with its delta on top.

The NBD server writes it from its lanes or its writer thread, or, for a write of whole
blocks, on its event loop while the kernel is far from throttling writers (the pwrite
then only copies into the page cache: ``lamina.serve.pagecache``). A read that touches
the delta is answered on the loop only when the page cache holds those blocks
(``would_block`` tries it with RWF_NOWAIT and keeps what it read for the ``read`` that
follows on the same thread); otherwise on a pool thread.
Writes hold the device's lock (a partial block is read, patched and written back, and
new blocks take the next slots of the delta); reads take none: the slots a read finds
in the map hold their data already, and overlapping requests in flight have no order.
"""

from __future__ import annotations

import threading

from lamina.delta.file import BLOCK, Delta
from lamina.home import Home
from lamina.image.device import HOLE, ImageDevice, merge_extents
from lamina.image.manifest import Manifest
from lamina.image.reader import ImageReader
from lamina.nbd import ExportInfo
from lamina.nbd.device import BlockDevice, Extent
from lamina.nbd.events import Buffer
from lamina.store import ChunkCache


class MachineDevice:
    """A machine: its pinned image version with its delta on top."""

    def __init__(self, info: ExportInfo, base: BlockDevice, delta: Delta) -> None:
        self.info = info
        self.base = base
        self.delta = delta
        self._writing = threading.Lock()
        self._ready = threading.local()  # a read done by would_block, for read

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        first = offset // BLOCK
        return first, -(-(offset + length) // BLOCK) - first

    def read(self, offset: int, length: int) -> list[memoryview]:
        ready = getattr(self._ready, "read", None)
        if ready is not None:
            self._ready.read = None
            if ready[0] == (offset, length):
                return ready[1]  # type: ignore[no-any-return]
        read = self._read(offset, length, wait=True)
        assert read is not None
        return read

    def _read(self, offset: int, length: int, *, wait: bool) -> list[memoryview] | None:
        """The segments of a read; with ``wait=False`` None when the delta's part of it is
        not in the page cache."""
        first, count = self._blocks(offset, length)
        if self.delta.untouched(first, count):
            return self.base.read(offset, length)
        out: list[memoryview] = []
        end = offset + length
        for run in self.delta.runs(first, count):
            start = max(offset, run.first * BLOCK)
            stop = min(end, (run.first + run.count) * BLOCK, self.info.size)
            if run.kind == "base":
                out += self.base.read(start, stop - start)
            elif run.kind == "zero":
                out.append(memoryview(bytes(stop - start)))
            else:
                slots = (
                    self.delta.read_slots(run.slot, run.count)
                    if wait
                    else self.delta.read_slots_cached(run.slot, run.count)
                )
                if slots is None:
                    return None
                data = memoryview(slots)
                out.append(data[start - run.first * BLOCK : stop - run.first * BLOCK])
        return out

    def would_block(self, offset: int, length: int) -> bool:
        if self.base.would_block(offset, length):
            return True
        first, count = self._blocks(offset, length)
        if self.delta.untouched(first, count):
            return False
        ready = self._read(offset, length, wait=False)
        self._ready.read = ((offset, length), ready) if ready is not None else None
        return ready is None

    def prefetch(self, offset: int, length: int) -> None:
        self.base.prefetch(offset, length)  # only the image part can block

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        with self._writing:
            self._write(offset, data, fua)

    def write_whole(self, offset: int, data: Buffer) -> bool:
        """Apply a write of whole blocks and return True; return False, with nothing
        done, for one with a partial block (it reads the blocks it patches first, and
        that read may wait for the image's chunks)."""
        if offset % BLOCK or len(data) % BLOCK:
            return False
        with self._writing:
            self.delta.write_blocks(offset // BLOCK, data)
        return True

    def _write(self, offset: int, data: Buffer, fua: bool) -> None:
        first, count = self._blocks(offset, len(data))
        head = offset - first * BLOCK
        total = count * BLOCK
        if head or len(data) != total:
            # Partial blocks at either end: read the current blocks and patch them.
            span = min(total, self.info.size - first * BLOCK)
            merged = bytearray(b"".join(self.read(first * BLOCK, span)))
            merged[head : head + len(data)] = data
            data = merged
        self.delta.write_blocks(first, data)
        if fua:
            self.delta.flush()

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        with self._writing:
            self._write_zeroes(offset, length, fua)

    def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        first = -(-offset // BLOCK)
        last = (offset + length) // BLOCK  # exclusive, whole blocks only
        if offset + length == self.info.size:
            last = -(-self.info.size // BLOCK)
        if last > first:
            self.delta.zero_blocks(first, last - first)
        for start, stop in (
            (offset, min(first * BLOCK, offset + length)),
            (max(last * BLOCK, offset), offset + length),
        ):
            if stop > start:
                self._write(start, bytes(stop - start), fua=False)
        if fua:
            self.delta.flush()

    def flush(self) -> None:
        self.delta.flush()

    def extents(self, offset: int, length: int) -> list[Extent]:
        first, count = self._blocks(offset, length)
        end = offset + length
        out: list[Extent] = []
        for run in self.delta.runs(first, count):
            start = max(offset, run.first * BLOCK)
            stop = min(end, (run.first + run.count) * BLOCK)
            if run.kind == "base":
                out += self.base.extents(start, stop - start)
            else:
                out.append((stop - start, HOLE if run.kind == "zero" else 0))
        return merge_extents(out)

    def close(self) -> None:
        self.delta.flush()
        self.delta.close()


def machine_device(
    home: Home,
    machine: str,
    info: ExportInfo,
    manifest: Manifest,
    manifest_id: bytes,
    cache: ChunkCache,
) -> MachineDevice:
    """A machine's view: its image version (read through ``cache``) under its delta."""
    base = ImageDevice(info, ImageReader(home.store, manifest, cache))
    delta = Delta(home.deltas_dir / machine, size=manifest.size, base_id=manifest_id)
    return MachineDevice(info, base, delta)
