"""The one interface between the NBD server and what it serves, and the simplest devices:
the write side of a read-only one, a small disk held in memory, and a read-only view of
another device (what a second client of a machine's disk gets while the first writes)."""

from __future__ import annotations

from dataclasses import replace
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


class ReadOnly:
    """The write side of a read-only device: writes refused with EPERM, nothing to flush
    or close."""

    refusal = "read-only export"

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        raise PermissionError(self.refusal)

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        raise PermissionError(self.refusal)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryDevice(ReadOnly):
    """A small read-only disk held in memory (a machine's seed)."""

    def __init__(self, info: ExportInfo, data: bytes) -> None:
        self.info = info
        self._data = memoryview(data)

    def read(self, offset: int, length: int) -> list[memoryview]:
        return [self._data[offset : offset + length]]

    def would_block(self, offset: int, length: int) -> bool:
        return False

    def prefetch(self, offset: int, length: int) -> None:
        pass

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [(length, 0)]


class ReadOnlyView(ReadOnly):
    """``device`` as a client that may only read it sees it: its export flagged read-only,
    writes refused with EPERM, reads of what the writer has written so far."""

    refusal = "another client writes this disk: this connection may only read it"

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self.info = replace(device.info, read_only=True)

    def read(self, offset: int, length: int) -> list[memoryview]:
        return self.device.read(offset, length)

    def would_block(self, offset: int, length: int) -> bool:
        return self.device.would_block(offset, length)

    def prefetch(self, offset: int, length: int) -> None:
        self.device.prefetch(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.device.extents(offset, length)
