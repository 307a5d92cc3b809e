"""The one interface between the NBD server and what it serves."""

from __future__ import annotations

from typing import Protocol

from lamina.nbd.events import Buffer
from lamina.nbd.negotiate import ExportInfo

Extent = tuple[int, int]  # (length, base:allocation flags)


class BlockDevice(Protocol):
    info: ExportInfo

    def read(self, offset: int, length: int) -> list[memoryview]: ...

    def would_block(self, offset: int, length: int) -> bool:
        """True when a read must fetch chunks from disk first."""
        ...

    def prefetch(self, offset: int, length: int) -> None:
        """Load what a read of this range needs into memory (runs on a worker thread, so
        the event loop never waits for the disk)."""
        ...

    def write(self, offset: int, data: Buffer, fua: bool) -> None: ...

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None: ...

    def flush(self) -> None: ...

    def extents(self, offset: int, length: int) -> list[Extent]: ...

    def close(self) -> None: ...
