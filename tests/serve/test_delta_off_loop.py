"""A machine's delta is written, and read from disk, off the event loop: a server in this
process over a real delta file, a real socket and lamina's NBD client, with the delta's
pages dropped from the page cache between writing and reading."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lamina.delta.device import MachineDevice
from lamina.delta.file import Delta
from lamina.nbd import Cmd, ExportInfo
from lamina.nbd.aio import NbdServerProtocol
from lamina.nbd.aioclient import NbdClient
from lamina.nbd.device import BlockDevice
from lamina.nbd.lanes import Lanes
from lamina.store import ChunkStore
from tests.serve.test_devices import base_image, machine


class Watched:
    """The machine's delta, noting the thread of every call that may touch its files."""

    def __init__(self, delta: Delta) -> None:
        self.delta = delta
        self.threads: dict[str, set[str]] = {}

    def _note(self, what: str) -> None:
        self.threads.setdefault(what, set()).add(threading.current_thread().name)

    def __getattr__(self, name: str) -> object:
        return getattr(self.delta, name)

    def write_blocks(self, first: int, data: bytes) -> None:
        self._note("write")
        self.delta.write_blocks(first, data)

    def read_slots(self, slot: int, count: int) -> bytes:
        self._note("read from disk")
        return self.delta.read_slots(slot, count)

    def read_slots_cached(self, slot: int, count: int) -> bytearray | None:
        self._note("read if cached")
        return self.delta.read_slots_cached(slot, count)

    def flush(self) -> None:
        self._note("flush")
        self.delta.flush()


class Provider:
    def __init__(self, device: BlockDevice) -> None:
        self.device = device

    def lookup(self, name: str) -> ExportInfo | None:
        return self.device.info if name == self.device.info.name else None

    def names(self) -> list[str]:
        return [self.device.info.name]

    def open(self, name: str, client: str) -> BlockDevice:
        return self.device

    def release(self, name: str, device: BlockDevice, *, ended: bool) -> None:
        pass


def test_delta_writes_and_uncached_reads_run_off_the_loop(tmp_path: Path) -> None:
    store = ChunkStore.open_local(tmp_path / "store")
    manifest, mid, _ = base_image(store)
    device: MachineDevice = machine(store, manifest, mid, tmp_path / "delta")
    watched = Watched(device.delta)
    device.delta = watched  # type: ignore[assignment]
    lanes = Lanes(2)
    pool = ThreadPoolExecutor(2, thread_name_prefix="pool")
    log = logging.getLogger("test")

    async def run() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        threading.current_thread().name = "loop"
        server = await loop.create_server(
            lambda: NbdServerProtocol(Provider(device), pool, log, lanes=lanes), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        client = await NbdClient.connect("127.0.0.1", port, "machine/t")
        assert (await client.request(Cmd.WRITE, 8192, data=b"\x5a" * 8192))[0] == 0
        assert (await client.request(Cmd.WRITE, 100, data=b"\xa5" * 300))[0] == 0
        assert (await client.request(Cmd.FLUSH))[0] == 0
        hot = (await client.request(Cmd.READ, 8192, 8192))[1]
        # the delta's data leaves the page cache: the next read must wait for the disk
        fd = os.open(tmp_path / "delta" / "delta.data", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        cold = (await client.request(Cmd.READ, 8192, 8192))[1]
        await client.close()
        server.close()
        return hot, cold

    main = threading.current_thread().name
    try:
        hot, cold = asyncio.run(run())
    finally:
        threading.current_thread().name = main
        lanes.close()
        pool.shutdown()
        device.close()
    assert hot == cold == b"\x5a" * 8192
    assert "loop" not in watched.threads["write"] | watched.threads["flush"]
    assert watched.threads["write"] <= {"lane-0", "lane-1"}
    assert "loop" not in watched.threads["read from disk"]
