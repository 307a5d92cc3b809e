"""An image version as a read-only block device, reading through a chunk cache."""

from __future__ import annotations

from lamina.image.manifest import Manifest
from lamina.image.reader import ImageReader
from lamina.nbd import ExportInfo, State
from lamina.nbd.device import Extent, ReadOnly
from lamina.store import ZERO_ID

HOLE = int(State.HOLE | State.ZERO)


def merge_extents(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for length, flags in extents:
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


def manifest_extents(m: Manifest, offset: int, length: int) -> list[Extent]:
    """An image version's extents: its unstored (all-zero) chunks are holes."""
    return merge_extents(
        [(n, HOLE if m.id_at(i) == ZERO_ID else 0) for i, _, n in m.spans(offset, length)]
    )


class ImageDevice(ReadOnly):
    """An image version: reads through the server-wide chunk cache."""

    def __init__(self, info: ExportInfo, reader: ImageReader) -> None:
        self.info = info
        self.reader = reader

    def read(self, offset: int, length: int) -> list[memoryview]:
        return self.reader.segments(offset, length)

    def would_block(self, offset: int, length: int) -> bool:
        m = self.reader.manifest
        cache = self.reader.cache
        return any(
            (cid := m.id_at(i)) != ZERO_ID and not cache.contains(cid)
            for i, _, _ in m.spans(offset, length)
        )

    def prefetch(self, offset: int, length: int) -> None:
        for index, _, _ in self.reader.manifest.spans(offset, length):
            self.reader.chunk(index)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return manifest_extents(self.reader.manifest, offset, length)
