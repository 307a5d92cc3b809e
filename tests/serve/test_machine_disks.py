"""A machine's disk across server restarts and boots, with real NBD clients: a restart or
a crash of the server keeps every delta (a client that reconnects reads what it wrote);
a stateless machine starts clean at its next boot (its first connection after a clean
disconnect, or after `machine reset`); one machine has one writer at a time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.nbd import Cmd, Errno, TransmissionFlag
from lamina.nbd.aioclient import NbdClient
from tests.conftest import Cli, write_sparse
from tests.nbdtools import Session, ok, qemu_io
from tests.servers import Server, wait_for

MiB = 1 << 20
DATA = os.urandom(64 * 1024)
AT = 1 * MiB

pytestmark = pytest.mark.peers


@pytest.fixture
def base(cli: Cli, tmp_path: Path) -> bytes:
    content = os.urandom(4 * MiB)
    cli("image", "import", "base", str(write_sparse(tmp_path / "b.raw", 4 * MiB, [(0, content)])))
    cli("machine", "add", "sl", "--image", "base", "--mode", "stateless")
    cli("machine", "add", "sf", "--image", "base", "--mode", "stateful")
    return content


@pytest.fixture
def server(cli: Cli, tmp_path: Path) -> Iterator[Server]:
    """Two worker processes (the default on two cores), whatever the host has."""
    srv = Server(cli.home, tmp_path / "serve.log", args=("--workers", "2"))
    yield srv
    srv.stop()


async def connect(server: Server, export: str) -> NbdClient:
    return await NbdClient.connect("127.0.0.1", server.port, export)


async def read(client: NbdClient, offset: int = AT, length: int = len(DATA)) -> bytes:
    error, data = await client.request(Cmd.READ, offset, length)
    assert error == 0
    return data


def drop(client: NbdClient) -> None:
    """The connection is gone without NBD_CMD_DISC (a crash of the client, a lost link)."""
    client.writer.transport.abort()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_restart_or_crash_of_the_server_keeps_a_stateless_disk(
    server: Server, base: bytes
) -> None:
    server.start()

    async def write() -> None:
        client = await connect(server, "machine/sl")
        assert (await client.request(Cmd.WRITE, AT, data=DATA))[0] == 0
        assert (await client.request(Cmd.FLUSH))[0] == 0
        drop(client)  # still "running" as far as the client knows: the server goes away

    run(write())
    server.stop(signal.SIGKILL)
    server.start()

    async def reconnect() -> bytes:
        client = await connect(server, "machine/sl")  # as qemu's reconnect-delay does
        data = await read(client)
        drop(client)
        return data

    assert run(reconnect()) == DATA
    server.stop(signal.SIGTERM)  # a clean stop of the server is no end of the machine's boot
    server.start()

    async def power_off() -> bytes:
        client = await connect(server, "machine/sl")
        data = await read(client)
        await client.close()  # NBD_CMD_DISC: qemu sends it at power-off
        return data

    assert run(power_off()) == DATA
    wait_for((server.home / "deltas" / "sl" / "ended").exists, 10)  # the goodbye is on disk
    server.stop(signal.SIGKILL)  # the end of the boot is durable: a crash does not undo it
    server.start()

    async def next_boot() -> tuple[bytes, bytes]:
        client = await connect(server, "machine/sl")
        data = await read(client)
        assert (await client.request(Cmd.WRITE, 0, data=b"x" * 4096))[0] == 0
        await client.close()
        again = await connect(server, "machine/sf")
        other = await read(again)
        await again.close()
        return data, other

    fresh, stateful = run(next_boot())
    assert fresh == base[AT : AT + len(DATA)]  # a new boot: clean
    assert stateful == base[AT : AT + len(DATA)]  # (nothing written there)
    boots = [json.loads(ln) for ln in server.log_lines() if '"new-boot"' in ln]
    assert [(b["machine"], b["delta"]) for b in boots] == [("sl", "dropped")]


def test_qemu_rides_out_a_kill_of_the_server_and_its_next_boot_is_clean(
    server: Server, base: bytes
) -> None:
    """qemu's own NBD client with reconnect-delay (as a VM's disk is opened): it writes and
    flushes, the server is killed and started again on the same port, the same qemu reads
    its write back; it quits (NBD_CMD_DISC), and the stateless machine's next boot is clean."""
    server.start()
    opts = (
        "driver=nbd,server.type=inet,server.host=127.0.0.1,"
        f"server.port={server.port},export=machine/sl,reconnect-delay=60"
    )
    qemu = Session(opts, image_opts=True)
    try:
        qemu.run(f"write -P 0x5a {AT} 65536")
        qemu.run("flush")
        server.stop(signal.SIGKILL)
        server.start()
        qemu.run(f"read -P 0x5a {AT} 65536")  # reconnected: what it wrote, not the image
        qemu.run(f"write -P 0x5b {AT + 65536} 4096")  # and it goes on writing
        qemu.run(f"read -P 0x5b {AT + 65536} 4096")
    finally:
        qemu.close()  # quits: NBD_CMD_DISC
    wait_for((server.home / "deltas" / "sl" / "ended").exists, 30)
    fresh = ok(qemu_io(server.url("machine/sl"), f"read -v {AT} 16", read_only=True))
    first = base[AT : AT + 16].hex()
    assert " ".join(first[i : i + 2] for i in range(0, 32, 2)) in fresh


def test_a_stateful_disk_keeps_its_writes_across_boots(server: Server, base: bytes) -> None:
    server.start()

    async def boot(write: bool) -> bytes:
        client = await connect(server, "machine/sf")
        if write:
            assert (await client.request(Cmd.WRITE, AT, data=DATA, flags=0))[0] == 0
        data = await read(client)
        await client.close()
        return data

    assert run(boot(True)) == DATA
    assert run(boot(False)) == DATA
    server.stop(signal.SIGKILL)
    server.start()
    assert run(boot(False)) == DATA


def test_machine_reset_starts_a_new_boot(cli: Cli, server: Server, base: bytes) -> None:
    server.start()

    async def write() -> None:
        client = await connect(server, "machine/sl")
        assert (await client.request(Cmd.WRITE, AT, data=DATA))[0] == 0
        assert (await client.request(Cmd.FLUSH))[0] == 0
        drop(client)

    run(write())
    server.stop(signal.SIGKILL)
    cli("machine", "reset", "sl")
    server.start()

    async def boot() -> bytes:
        client = await connect(server, "machine/sl")
        data = await read(client)
        await client.close()
        return data

    assert run(boot()) == base[AT : AT + len(DATA)]


@pytest.mark.parametrize("workers", ["2", "0"])
def test_a_second_writer_gets_the_disk_read_only(
    cli: Cli, base: bytes, tmp_path: Path, workers: str
) -> None:
    """In worker processes (the second client's handshake lands in either) and in the
    server's own process alike."""
    server = Server(cli.home, tmp_path / "serve.log", args=("--workers", workers))
    server.start()
    try:
        run(second_writer(server, tmp_path))
    finally:
        server.stop()
    refused = [json.loads(ln) for ln in server.log_lines() if '"second-writer"' in ln]
    assert len(refused) >= 4 and {r["export"] for r in refused} == {"machine/sf"}
    assert all(r["writer"] for r in refused)


async def second_writer(server: Server, tmp_path: Path) -> None:
    first = await connect(server, "machine/sf")
    assert not first.flags & TransmissionFlag.READ_ONLY
    assert (await first.request(Cmd.WRITE, AT, data=DATA))[0] == 0

    second = await connect(server, "machine/sf")
    assert second.flags & TransmissionFlag.READ_ONLY
    assert (await second.request(Cmd.WRITE, 0, data=b"y" * 4096))[0] == Errno.EPERM
    assert await read(second) == DATA  # it reads the machine's disk as it is
    # qemu opening it to write is refused; nbdinfo sees it read-only; qemu-img reads it
    assert qemu_io(server.url("machine/sf"), "write -P 7 0 4096").returncode != 0
    for _ in range(2):  # in either worker
        info = subprocess.run(
            ["nbdinfo", "--json", server.url("machine/sf")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert json.loads(info)["exports"][0]["is_read_only"]
    out = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", server.url("machine/sf"), str(out)],
                   check=True)  # fmt: skip
    assert out.read_bytes()[AT : AT + len(DATA)] == DATA
    await second.close()
    assert await read(first) == DATA
    await first.close()
    while not (server.home / "deltas" / "sf" / "ended").exists():  # the writer is gone
        await asyncio.sleep(0.02)

    third = await connect(server, "machine/sf")  # the writer left: the next one writes
    assert not third.flags & TransmissionFlag.READ_ONLY
    await third.close()
