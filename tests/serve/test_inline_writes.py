"""Writes of whole blocks into a machine's delta are applied on the event loop while they
can only copy into the page cache; every other write goes to the writer thread: one with
a partial block (it must read first), any while the kernel has much memory dirty, and
any for a while after one applied on the loop was slow. A server in this process over a
real home, a real socket and lamina's NBD client; the delta notes which thread wrote."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from lamina.delta.file import Delta
from lamina.home import Home
from lamina.image.importer import Imported, import_and_commit
from lamina.manager.services import images, machines
from lamina.nbd import Cmd
from lamina.nbd.aioclient import NbdClient
from lamina.serve import pagecache, shared
from lamina.serve.handshake import NbdService
from lamina.serve.pagecache import DirtyGauge, calm
from tests.conftest import write_sparse

MiB = 1 << 20
GiB = 1 << 30


def test_calm_is_below_the_background_level() -> None:
    info = {"MemAvailable": 10 * GiB, "Dirty": 900 * MiB, "Writeback": 123 * MiB}
    assert calm(info, 0, 10)  # 1023 MiB < 10% of 10 GiB
    assert not calm(info | {"Writeback": 124 * MiB}, 0, 10)
    assert not calm(info, 512 * MiB, 10)  # dirty_background_bytes wins when set
    assert calm(info, 1 * GiB + 1, 0)


def test_the_gauge_reads_meminfo_at_most_every_interval() -> None:
    now = [0.0]
    reads: list[float] = []

    def meminfo() -> dict[str, int]:
        reads.append(now[0])
        return {"MemAvailable": 10 * GiB, "Dirty": 0, "Writeback": 0}

    gauge = DirtyGauge(lambda: now[0], meminfo)
    for t in (0.0, 0.05, 0.09, 0.1, 0.15, 0.35):
        now[0] = t
        assert gauge.calm()
    assert reads == [0.0, 0.1, 0.35]
    assert pagecache.read_meminfo()["MemTotal"] > 0  # this host's, in bytes


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The name of the thread of each write into a delta."""
    names: list[str] = []
    write_blocks = Delta.write_blocks

    def noted(self: Delta, first: int, data: bytes) -> None:
        names.append(threading.current_thread().name)
        write_blocks(self, first, data)

    monkeypatch.setattr(Delta, "write_blocks", noted)
    yield names


@pytest.fixture
def machine(home: Home, tmp_path: Path) -> str:
    src = write_sparse(tmp_path / "d.raw", 4 * MiB, [(0, os.urandom(MiB))])

    def commit(imported: Imported) -> str:
        with home.session() as session:
            return images.add_version(session, name="base", imported=imported, source="t").ref

    import_and_commit(home.store, src, commit)
    with home.session() as session:
        machines.add(session, name="m", image="base")
    return "machine/m"


Body = Callable[[NbdService, int], Awaitable[None]]  # the service, and its port


async def _serve(home: Home, body: Body) -> None:
    service = NbdService(home, logging.getLogger("test"))
    server = await asyncio.get_running_loop().create_server(service.protocol, "127.0.0.1", 0)
    try:
        await body(service, server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await service.close()


def _run(home: Home, body: Body) -> None:
    main = threading.current_thread().name
    threading.current_thread().name = "loop"
    try:
        asyncio.run(_serve(home, body))
    finally:
        threading.current_thread().name = main


async def _write(client: NbdClient, offset: int, data: bytes) -> None:
    assert (await client.request(Cmd.WRITE, offset, data=data))[0] == 0


def test_whole_blocks_are_written_on_the_loop_partial_ones_on_the_writer(
    home: Home, machine: str, threads: list[str]
) -> None:
    async def body(service: NbdService, port: int) -> None:
        client = await NbdClient.connect("127.0.0.1", port, machine)
        await _write(client, 8192, b"\x5a" * 8192)
        await _write(client, 100, b"\xa5" * 300)  # inside block 0: read, patch, write
        await _write(client, 65536, b"\x11" * 4096)
        assert (await client.request(Cmd.READ, 8192, 8192))[1] == b"\x5a" * 8192
        block0 = (await client.request(Cmd.READ, 0, 4096))[1]
        assert block0[100:400] == b"\xa5" * 300
        assert (await client.request(Cmd.READ, 65536, 4096))[1] == b"\x11" * 4096
        await client.close()

    _run(home, body)
    assert threads == ["loop", "writer", "loop"]


def test_writes_wait_for_the_writer_while_the_kernel_has_much_dirty(
    home: Home, machine: str, threads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dirty = {"MemAvailable": 10 * GiB, "Dirty": 3 * GiB, "Writeback": 0}
    monkeypatch.setattr(pagecache, "read_meminfo", lambda: dirty)

    async def body(service: NbdService, port: int) -> None:
        client = await NbdClient.connect("127.0.0.1", port, machine)
        await _write(client, 0, b"\x01" * 4096)
        assert (await client.request(Cmd.READ, 0, 4096))[1] == b"\x01" * 4096
        await client.close()

    _run(home, body)
    assert threads == ["writer"]


def test_a_write_that_waited_on_the_loop_sends_the_next_ones_to_the_writer(
    home: Home, machine: str, threads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_blocks = Delta.write_blocks  # (the fixture's, noting threads)

    def waits(self: Delta, first: int, data: bytes) -> None:
        if first == 0:
            time.sleep(2 * shared.SLOW)  # as a write held up by writeback would
        write_blocks(self, first, data)

    monkeypatch.setattr(Delta, "write_blocks", waits)

    async def body(service: NbdService, port: int) -> None:
        client = await NbdClient.connect("127.0.0.1", port, machine)
        await _write(client, 0, b"\x01" * 4096)  # on the loop: it waited
        await _write(client, 4096, b"\x02" * 4096)  # within QUIET: the writer's
        await client.close()

    _run(home, body)
    assert threads == ["loop", "writer"]


def test_a_write_preempted_but_not_waiting_stays_on_the_loop(
    home: Home, machine: str, threads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared, "SLOW", -1.0)  # any time is long; but nothing slept

    async def body(service: NbdService, port: int) -> None:
        client = await NbdClient.connect("127.0.0.1", port, machine)
        for block in range(4):
            await _write(client, block * 4096, bytes([block]) * 4096)
        await client.close()

    _run(home, body)
    assert threads.count("loop") >= 3  # (a page fault of the map may sleep once)
