"""The network root's keeper, the parts that run on any host: the disks it reads from the
command line the boot script gives a machine, its NBD handshake against a real ``lamina
serve`` (the socket it hands the kernel is ready for requests), its refusal of a root that
comes back read-only, and the generic netlink messages (resolved against this kernel's
own controller; the ``nbd`` family itself needs a guest kernel, ``make e2e``)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from lamina.errors import ProtocolError
from lamina.guest import genl
from lamina.guest.netroot import Disk, connect, disks, parse_target
from lamina.nbd.client import ClientConnection, SimpleReplyReceived
from lamina.nbd.constants import Cmd
from lamina.nbd.events import NEED_DATA
from lamina.netboot.ipxe import NbdTarget, kernel_args
from tests.conftest import Cli, write_sparse
from tests.servers import Server

MiB = 1 << 20
MAC = "52:54:00:12:34:56"


def test_the_disks_of_the_command_line_a_boot_script_gives() -> None:
    args = kernel_args(
        "ro quiet", machine="desk-001", mac=MAC, root_partition=1, nbd=NbdTarget("10.0.2.2", 10809)
    )
    found, tls = disks(args)
    assert found == [
        Disk(0, "10.0.2.2", 10809, "machine/desk-001", writable=True),
        Disk(1, "10.0.2.2", 10809, "machine/desk-001/seed", writable=False),
    ]
    assert tls is False
    tls_args = kernel_args(
        "", machine="m", mac=MAC, root_partition=0, nbd=NbdTarget("fd00::1", 10809, tls=True)
    )
    found, tls = disks(tls_args)
    assert tls is True and found[0] == Disk(0, "fd00::1", 10809, "machine/m", writable=True)
    assert disks("ro root=UUID=1234 quiet") == ([], False)


@pytest.mark.parametrize("bad", ["host/export", "host:port/x", ":10809/x", "host:10809"])
def test_a_target_that_is_not_host_port_export_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT/EXPORT"):
        parse_target(bad)


def read(sock: socket.socket, offset: int, length: int) -> bytes:
    """One NBD READ on a socket past its handshake (what the kernel will send)."""
    conn = ClientConnection()
    conn.phase = conn.phase.TRANSMISSION
    sock.sendall(conn.request(Cmd.READ, 7, offset, length))
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(sock.recv(65536))
            continue
        assert isinstance(event, SimpleReplyReceived) and event.handle == 7 and event.error == 0
        return event.data


def test_a_new_connection_is_ready_for_the_kernel(cli: Cli, server: Server, tmp_path: Path) -> None:
    content = b"lamina-root!" * 1000
    cli("image", "import", "base", str(write_sparse(tmp_path / "b.raw", 4 * MiB, [(MiB, content)])))
    cli("machine", "add", "desk-001", "--image", "base", "--mac", MAC)
    server.start()
    root = Disk(0, "127.0.0.1", server.port, "machine/desk-001", writable=True)
    with connect(root) as sock:
        assert sock.gettimeout() is None  # the kernel's socket blocks
        assert read(sock, MiB, len(content)) == content
        # while that connection holds the disk, another one gets it read-only: not a root
        with pytest.raises(ProtocolError, match="came back read-only"):
            connect(root)
    seed = Disk(1, "127.0.0.1", server.port, "machine/desk-001/seed", writable=False)
    with connect(seed) as sock:
        assert b"CD001" in read(sock, 32768, 2048)  # an ISO 9660 volume descriptor
    with pytest.raises(ProtocolError, match="refused machine/nobody"):
        connect(Disk(0, "127.0.0.1", server.port, "machine/nobody", writable=True))


def test_netlink_messages_round_trip() -> None:
    body = genl.reconfigure(3, timeout=30, dead_conn_timeout=600, fd=9)
    fields = dict(genl.attrs(body))
    assert struct.unpack("=I", fields[genl.NBD_ATTR_INDEX]) == (3,)
    assert struct.unpack("=Q", fields[genl.NBD_ATTR_TIMEOUT]) == (30,)
    assert struct.unpack("=Q", fields[genl.NBD_ATTR_DEAD_CONN_TIMEOUT]) == (600,)
    (item,) = genl.attrs(fields[genl.NBD_ATTR_SOCKETS])
    assert item[0] == genl.NBD_SOCK_ITEM
    assert dict(genl.attrs(item[1])) == {genl.NBD_SOCK_FD: struct.pack("=I", 9)}
    # an event as the kernel multicasts it
    raw = genl.message(33, genl.NBD_CMD_LINK_DEAD, genl.u32(genl.NBD_ATTR_INDEX, 0), 0)
    (msg,) = genl.messages(raw)
    assert genl.dead_index(msg, family=33) == 0
    assert genl.dead_index(msg, family=34) is None
    with pytest.raises(Exception, match="bad netlink attribute length"):
        list(genl.attrs(struct.pack("=HH", 64, 1)))


def test_a_family_is_resolved_by_this_kernels_controller() -> None:
    """The controller describes itself (``nlctrl``, id 0x10, group ``notify``): the
    request and the parsing of its reply are those that resolve ``nbd`` in a guest."""
    link = genl.NbdNetlink(genl.CTRL_NAME)
    try:
        assert link.family == genl.GENL_ID_CTRL
        assert "notify" in link.groups
        assert link.drain(0.05) == []  # nothing came; the socket blocks again afterwards
        assert link.sock.gettimeout() is None
    finally:
        link.close()
