"""A network-booted machine keeps its root disk when its NBD connection is lost (``lamina
serve`` restarted, a TCP reset): ``lamina-netroot.service``, started early in the
machine's boot, run as ``python3 -m lamina.guest.netroot``.

The initramfs connected the disks with Debian's nbd-client 3.24 (``nbdroot=``, then
``lamina.seed=``), through the kernel's netlink interface. That nbd-client does not
reconnect, and leaves the kernel's dead-connection timeout at 0, so a lost connection
fails every request at once (EIO, and ext4 aborts its journal). This service:

1. sets, for each of the machine's NBD devices, a dead-connection timeout
   (``DEAD_CONN_TIMEOUT``): requests on a device whose connection died wait that long
   for a new one instead of failing; and a request timeout (``REQUEST_TIMEOUT``), after
   which a request sent on a connection that died unanswered is sent again on the new one;
2. listens for the kernel's NBD_CMD_LINK_DEAD events; for each, connects again (TCP,
   the NBD handshake with NBD_OPT_GO for the same export) and hands the socket to the
   kernel with NBD_CMD_RECONFIGURE, every ``RETRY`` seconds until it succeeds.

Everything it needs is loaded and locked in memory before it waits (``mlockall``): when
the root's connection is gone, a page fault on the root would wait for this very
service. With ``lamina.tls=1`` the connections are TLS, which the kernel cannot carry
itself (nbd-client relays them) and the boot credential is valid for an hour only: the
service then says so and keeps nothing.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from lamina.errors import LaminaError, ProtocolError
from lamina.guest import genl
from lamina.nbd.client import ClientConnection, Greeting
from lamina.nbd.constants import HandshakeFlag, Info, Rep, TransmissionFlag
from lamina.nbd.events import NEED_DATA, Closed, OptionReply

# A request may wait this long on a connection before it is sent again on another: far
# above what a loaded server takes (TCG guests on a busy 2-core host saw reads of ~2 s).
REQUEST_TIMEOUT = 30
# How long requests wait for a new connection once theirs died: a server restart takes
# seconds; a machine whose server stays away longer fails as it would have at once.
DEAD_CONN_TIMEOUT = 600
RETRY = 1.0  # seconds between attempts to connect again
CONNECT_TIMEOUT = 10.0
BATCH = 0.5  # seconds to gather the dead-link events of one loss
MCL_CURRENT, MCL_FUTURE = 1, 2


@dataclass(frozen=True, slots=True)
class Disk:
    index: int  # /dev/nbdINDEX
    host: str
    port: int
    export: str
    writable: bool  # the root is; a connection that comes back read-only is not taken


def parse_target(text: str) -> tuple[str, int, str]:
    """``HOST:PORT/EXPORT`` or ``[V6]:PORT/EXPORT`` (lamina's ``nbdroot=`` form)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        rest = rest.removeprefix(":")
    else:
        host, _, rest = text.partition(":")
    port, _, export = rest.partition("/")
    if not host or not port.isdigit() or not export:
        raise ValueError(f"not HOST:PORT/EXPORT: {text!r}")
    return host, int(port), export


def disks(cmdline: str) -> tuple[list[Disk], bool]:
    """The machine's NBD disks from its kernel command line, and whether they use TLS."""
    args = dict(word.partition("=")[::2] for word in cmdline.split())
    found: list[Disk] = []
    root = args.get("root", "")
    if "nbdroot" in args and root.startswith("/dev/nbd"):
        index = int(root.removeprefix("/dev/nbd").partition("p")[0])
        found.append(Disk(index, *parse_target(args["nbdroot"]), writable=True))
    if "lamina.seed" in args:
        seed = 1 if not found or found[0].index != 1 else 0
        found.append(Disk(seed, *parse_target(args["lamina.seed"]), writable=False))
    return found, args.get("lamina.tls") == "1"


def handshake(sock: socket.socket, export: str) -> int:
    """Fixed newstyle negotiation with NBD_OPT_GO; the export's transmission flags. The
    socket is then in the transmission phase, as the kernel takes it."""
    conn = ClientConnection()
    flags: int | None = None
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, Closed):
            raise ProtocolError(f"the server hung up during the handshake of {export}")
        elif isinstance(event, Greeting):
            no_zeroes = bool(event.handshake_flags & HandshakeFlag.NO_ZEROES)
            sock.sendall(conn.client_flags(no_zeroes) + conn.go(export, requests=()))
        elif isinstance(event, OptionReply):
            info = event.data[:2]
            if event.reply == Rep.INFO and info == struct.pack(">H", Info.EXPORT):
                _size, flags = struct.unpack_from(">QH", event.data, 2)
            elif event.reply == Rep.ACK:
                if flags is None:
                    raise ProtocolError(f"the server described no export {export}")
                return flags
            elif event.reply != Rep.INFO:
                raise ProtocolError(f"the server refused {export}: {event.reply.name}")


def connect(disk: Disk) -> socket.socket:
    """A new connection to ``disk``'s export, past its handshake."""
    sock = socket.create_connection((disk.host, disk.port), timeout=CONNECT_TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flags = handshake(sock, disk.export)
        if disk.writable and flags & TransmissionFlag.READ_ONLY:
            # the server still holds the dead connection as the writer: it lets go of
            # it when it sees it closed
            raise ProtocolError(f"{disk.export} came back read-only")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


class Keeper:
    def __init__(self, disks: list[Disk], link: genl.NbdNetlink, log: Callable[[str], None]):
        self.disks = {d.index: d for d in disks}
        self.link = link
        self.log = log

    def arm(self) -> None:
        """The timeouts that make requests wait for a new connection instead of failing."""
        for disk in self.disks.values():
            body = genl.reconfigure(
                disk.index, timeout=REQUEST_TIMEOUT, dead_conn_timeout=DEAD_CONN_TIMEOUT
            )
            self.link.request(genl.NBD_CMD_RECONFIGURE, body)
            wait = f"waits up to {DEAD_CONN_TIMEOUT} s for a lost connection"
            self.log(f"nbd{disk.index} ({disk.export}): {wait}")

    def reconnect(self, disk: Disk) -> float:
        """Connect ``disk`` again, as often as it takes; seconds it took."""
        started = time.monotonic()
        tries = 0
        while True:
            tries += 1
            try:
                sock = connect(disk)
            except (OSError, LaminaError) as exc:
                if tries == 1 or tries % 30 == 0:
                    again = f"trying every {RETRY:.0f} s"
                    self.log(f"nbd{disk.index}: cannot connect yet ({exc}); {again}")
                time.sleep(RETRY)
                continue
            try:
                body = genl.reconfigure(disk.index, fd=sock.fileno())
                self.link.request(genl.NBD_CMD_RECONFIGURE, body)
            finally:
                sock.close()  # the kernel holds its own reference now
            return time.monotonic() - started

    def run(self) -> None:
        self.link.subscribe()
        self.arm()
        for msg in self.link.events():
            if self._dead(msg) is None:
                continue
            # a server that went away takes every disk's connection at once: the root's
            # comes back first, whatever order the kernel reported them in
            batch = [msg, *self.link.drain(BATCH)]
            dead = {i for i in map(self._dead, batch) if i is not None}
            for index in sorted(dead, key=lambda i: (not self.disks[i].writable, i)):
                disk = self.disks[index]
                self.log(f"nbd{index}: the connection to {disk.host}:{disk.port} was lost")
                took = self.reconnect(disk)
                self.log(f"nbd{index}: connected again to {disk.export} after {took:.1f} s")

    def _dead(self, msg: genl.Message) -> int | None:
        index = genl.dead_index(msg, self.link.family)
        return index if index in self.disks else None


def lock_memory() -> None:
    """Keep this process's pages in memory: see the module docstring."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        raise OSError(ctypes.get_errno(), "mlockall failed")


def main(argv: list[str] | None = None) -> int:
    def log(text: str) -> None:
        print(f"lamina-netroot: {text}", file=sys.stderr, flush=True)

    with open("/proc/cmdline") as f:
        found, tls = disks(f.read())
    if not found:
        log("no NBD root on the kernel command line: nothing to keep")
        return 0
    if tls:
        log("the disks are connected over TLS: a lost connection is not taken over")
        return 0
    link = genl.NbdNetlink()
    lock_memory()
    Keeper(found, link, log).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
