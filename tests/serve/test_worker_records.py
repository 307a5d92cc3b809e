"""NBD worker processes ask their parent what the database says: a worker that served a
machine's disk over TLS (a certificate checked, a boot recorded, an image version
listed) holds no database layer, no HTTP framework and no X.509 code, and the channel to
the parent carries messages larger than one datagram."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

from lamina.serve.channel import Channel
from tests.attacks import family
from tests.conftest import Cli, write_sparse
from tests.nbdtools import ok, qemu_io, tls_image
from tests.servers import Server

# Extension modules of what a worker must not load (their shared objects show in its
# memory map): SQLAlchemy's, pydantic's core (FastAPI's models), cryptography's.
HEAVY = ("/sqlalchemy/", "/pydantic_core/", "/cryptography/")


def _mapped(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if line.rstrip().endswith(".so")}


def test_a_worker_serves_over_tls_without_the_database_layer(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    src = write_sparse(tmp_path / "base.raw", 8 << 20, [(0, os.urandom(1 << 20))])
    cli("image", "import", "base", str(src))
    cli("machine", "add", "m1", "--image", "base", "--mode", "stateful")
    server.args = ("--tls",)
    server.start()
    creds = tmp_path / "m1"
    cli("machine", "credentials", "m1", "--out", str(creds), "--server", f"127.0.0.1:{server.port}")
    ok(qemu_io(tls_image(server.port, "machine/m1"), "write -P 0x33 0 64k", tls=creds))
    ok(qemu_io(tls_image(server.port, "base@1"), "read 0 64k", read_only=True, tls=creds))
    # another machine's disk is still refused: the parent read the certificate's holder
    refused = qemu_io(tls_image(server.port, "machine/m2"), "read 0 4k", tls=creds)
    assert refused.returncode != 0
    assert server.proc is not None
    workers = family(server.proc.pid)[1:]
    assert workers
    for pid in workers:
        heavy = [m for m in _mapped(pid) if any(h in m for h in HEAVY)]
        assert not heavy, f"worker {pid} loaded {heavy}"
    assert any("/sqlalchemy/" in m for m in _mapped(server.proc.pid))  # (the check sees it)


def test_the_channel_carries_a_message_larger_than_a_datagram() -> None:
    async def exchange() -> list[tuple[Any, ...]]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        got: list[tuple[Any, ...]] = []
        done = asyncio.Event()

        def received(message: tuple[Any, ...], fds: list[int]) -> None:
            got.append(message)
            if len(got) == 3:
                done.set()

        sender = Channel(a, lambda m, f: None, lambda: None)
        receiver = Channel(b, received, done.set)
        names = [f"machine/desk-{i:05d}" for i in range(20_000)]  # about 400 KiB pickled
        sender.send(("small",))
        sender.send(("names", names))
        sender.send(("after",))
        await asyncio.wait_for(done.wait(), 30)
        sender.close()
        receiver.close()
        return got

    got = asyncio.run(exchange())
    assert got[0] == ("small",) and got[2] == ("after",)
    assert got[1][0] == "names" and len(got[1][1]) == 20_000
    assert got[1][1][-1] == "machine/desk-19999"
