"""What the stream endpoint serves: the image through its cache, a machine's local deltas
on top, and the one-export catalog the NBD server asks.

Reads of cached chunks are answered on the event loop from the cache's data file. A read
that needs a missing chunk is handed to a worker thread (``prefetch``), which waits for
the fetch on the event loop, up to the endpoint's ``--timeout``, then fails with EIO.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable

from lamina.delta.file import ABSENT, BLOCK
from lamina.errors import LaminaError
from lamina.image.device import manifest_extents
from lamina.nbd import ExportInfo
from lamina.nbd.device import BlockDevice, Extent, ReadOnly
from lamina.nbd.events import Buffer
from lamina.stream.cache import ChunkFiles
from lamina.stream.fetch import Fetcher
from lamina.stream.stack import DeltaStack


class StreamImageDevice(ReadOnly):
    """The streamed image version, read-only."""

    refusal = "read-only export (stream with --machine NAME to write)"

    def __init__(
        self,
        info: ExportInfo,
        files: ChunkFiles,
        fetcher: Fetcher,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
    ) -> None:
        self.info = info
        self.files = files
        self.index = files.index
        self.fetcher = fetcher
        self.loop = loop
        self.timeout = timeout

    def read(self, offset: int, length: int) -> list[memoryview]:
        if not self.index.all_cached(offset, length):
            raise OSError(errno.EIO, "read of a chunk that is not cached")
        return [self.files.read(offset, length)]

    def would_block(self, offset: int, length: int) -> bool:
        return not self.index.all_cached(offset, length)

    def prefetch(self, offset: int, length: int) -> None:
        """On a worker thread: wait until the range is cached (or fail with EIO)."""
        future = asyncio.run_coroutine_threadsafe(
            self.fetcher.ensure_range(offset, length, self.timeout), self.loop
        )
        try:
            future.result(self.timeout + 5)
        except TimeoutError:
            future.cancel()
            raise OSError(errno.EIO, "fetch timed out") from None

    def extents(self, offset: int, length: int) -> list[Extent]:
        return manifest_extents(self.files.manifest, offset, length)


class StreamMachineDevice:
    """A machine: the image with the local delta stack on top, writable.

    ``MachineDevice.would_block`` asks the image alone (cheap on a server, where any
    chunk is a disk read away); here a missing chunk may be a network fetch that cannot
    succeed offline, so only blocks no delta covers may wait for the image.
    """

    def __init__(self, info: ExportInfo, image: StreamImageDevice, stack: DeltaStack) -> None:
        self.info = info
        self.image = image
        self.stack = stack
        self.inner: BlockDevice = stack.device(info, image)

    def rebuild(self) -> None:
        """After the stack changed (a sync sealed or merged a layer): on the event loop."""
        self.inner = self.stack.device(self.info, self.image)

    def _uncovered(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Byte ranges of ``[offset, offset+length)`` that no delta holds."""
        maps = [d.map for d in self.stack.deltas.values() if d.used_blocks]
        if not maps:
            return [(offset, length)]
        end = offset + length
        out: list[tuple[int, int]] = []
        for block in range(offset // BLOCK, -(-end // BLOCK)):
            if all(m[block] == ABSENT for m in maps):
                start = max(offset, block * BLOCK)
                stop = min(end, (block + 1) * BLOCK)
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + stop - start)
                else:
                    out.append((start, stop - start))
        return out

    def read(self, offset: int, length: int) -> list[memoryview]:
        return self.inner.read(offset, length)

    def would_block(self, offset: int, length: int) -> bool:
        if not self.image.would_block(offset, length):
            return False
        return any(self.image.would_block(o, n) for o, n in self._uncovered(offset, length))

    def prefetch(self, offset: int, length: int) -> None:
        for o, n in self._uncovered(offset, length):
            self.image.prefetch(o, n)

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        self.inner.write(offset, data, fua)

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        self.inner.write_zeroes(offset, length, fua)

    def flush(self) -> None:
        self.stack.active.flush()

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.inner.extents(offset, length)

    def close(self) -> None:
        self.stack.flush()


class StreamCatalog:
    """The endpoint's exports (the DeviceProvider the NBD server asks): the image or
    machine, and for a machine its identity seed. Only the first counts as a boot."""

    def __init__(
        self,
        device: BlockDevice,
        extra: list[BlockDevice] | None = None,
        on_first: Callable[[], None] = lambda: None,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self.device = device
        self.devices = {d.info.name: d for d in [device, *(extra or [])]}
        self.on_first = on_first
        self.on_idle = on_idle
        self._refs = 0
        self._lock = threading.Lock()

    def lookup(self, name: str) -> ExportInfo | None:
        device = self.devices.get(name)
        return device.info if device is not None else None

    def names(self) -> list[str]:
        return list(self.devices)

    def open(self, name: str, client: str) -> BlockDevice:
        device = self.devices.get(name)
        if device is None:
            raise LaminaError(f"no export {name!r}")
        if device is not self.device:
            return device
        with self._lock:
            self._refs += 1
            first = self._refs == 1
        if first:
            self.on_first()
        return device

    def release(self, name: str, device: BlockDevice, *, ended: bool) -> None:
        if self.devices.get(name) is not self.device:
            return
        with self._lock:
            self._refs -= 1
            idle = self._refs == 0
        if idle:
            self.device.flush()
            self.on_idle()

    @property
    def connections(self) -> int:
        return self._refs
