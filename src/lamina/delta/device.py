"""A machine's disk as a block device: its pinned image version with its delta on top."""

from __future__ import annotations

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

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        first = offset // BLOCK
        return first, -(-(offset + length) // BLOCK) - first

    def read(self, offset: int, length: int) -> list[memoryview]:
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
                data = memoryview(self.delta.read_slots(run.slot, run.count))
                out.append(data[start - run.first * BLOCK : stop - run.first * BLOCK])
        return out

    def would_block(self, offset: int, length: int) -> bool:
        # Conservative: blocks covered by the delta never need the image, but asking the
        # image alone is cheaper than walking the map on every read.
        return self.base.would_block(offset, length)

    def prefetch(self, offset: int, length: int) -> None:
        self.base.prefetch(offset, length)  # only the image part can block

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
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
                self.write(start, bytes(stop - start), fua=False)
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
