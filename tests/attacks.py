"""What an attacker on the provisioning network sends, as plain sockets, and how much the
server pays for it (its RSS, read from /proc). Every attack here is bounded: it gives up
as soon as the server's RSS passes the limit under test, so a server that fails the test
is not driven out of memory by it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import struct
import threading
from pathlib import Path

from lamina.nbd.client import ClientConnection
from lamina.nbd.constants import REQUEST, REQUEST_MAGIC, Cmd, Opt, Rep
from lamina.nbd.events import NEED_DATA, Closed, OptionReply

MiB = 1 << 20


def rss(pid: int) -> int:
    """A process's resident set, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (a server's worker processes)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
    return found


def pss(pid: int) -> int:
    """A process's proportional set: its private pages, and its share of those it shares
    (a library's pages mapped by three processes count a third in each)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss for {pid}")


def family_pss(pid: int) -> int:
    """The proportional sets of ``pid`` and its descendants, summed."""
    total = 0
    for p in family(pid):
        try:
            total += pss(p)
        except (OSError, AssertionError):
            continue  # exited meanwhile
    return total


def family_rss(pid: int) -> tuple[int, int]:
    """The resident sets of ``pid`` and of its descendants, summed: (all, descendants)."""
    own = rss(pid)
    children = 0
    for p in family(pid)[1:]:
        try:
            children += rss(p)
        except (OSError, AssertionError):
            continue  # exited meanwhile
    return own + children, children


class RssWatch:
    """The highest RSS of a process and its descendants (a server and its workers) while
    the block runs, summed, sampled every 5 ms on a thread of its own; when the sum
    passes ``limit`` they are killed there and then (SIGKILL), so an attack that works
    costs the machine no more than that. ``peak``: the whole family's; ``workers``: the
    descendants' alone; ``pss``: the family's proportional sets at the RSS peak."""

    def __init__(self, pid: int, limit: int, *, workers_only: bool = False) -> None:
        self.pid = pid
        self.limit = limit
        self.workers_only = workers_only
        self.peak = 0
        self.workers = 0
        self.pss = 0
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            try:
                total, children = family_rss(self.pid)
            except (OSError, AssertionError):
                return  # the process is gone
            if total > self.peak:
                self.peak = total
                self.pss = family_pss(self.pid)
            self.workers = max(self.workers, children)
            if (children if self.workers_only else total) > self.limit:
                for p in family(self.pid):
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGKILL)
                self.killed = True
                return

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class RawNbd:
    """A blocking NBD client that does as told, and nothing more (replies unread)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.conn = ClientConnection()

    def _event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            data = self.sock.recv(1 << 16)
            self.conn.receive_data(data)
            if not data:
                return self.conn.next_event()

    def greet(self) -> bool:
        """Take the greeting and answer it; False when the server hung up instead."""
        if isinstance(self._event(), Closed):
            return False
        self.sock.sendall(self.conn.client_flags())
        return True

    def option(self, data: bytes) -> list[OptionReply]:
        self.sock.sendall(data)
        replies: list[OptionReply] = []
        while True:
            event = self._event()
            assert isinstance(event, OptionReply), event
            replies.append(event)
            if event.reply in (Rep.ACK,) or event.reply >= 1 << 31:
                return replies

    def go(self, export: str, *, tls: Path | None = None) -> list[OptionReply]:
        """Choose ``export``; with ``tls`` (a folder of qemu's credential files), after
        NBD_OPT_STARTTLS with that client certificate."""
        self.greet()
        if tls is not None:
            assert self.option(self.conn.option(Opt.STARTTLS))[-1].reply == Rep.ACK
            context = ssl.create_default_context(cafile=tls / "ca-cert.pem")
            context.load_cert_chain(tls / "client-cert.pem", tls / "client-key.pem")
            host = self.sock.getpeername()[0]
            self.sock = context.wrap_socket(self.sock, server_hostname=host)
        return self.option(self.conn.go(export))

    def reads(self, count: int, length: int, offset: int = 0) -> bytes:
        """``count`` READ requests of ``length`` bytes, back to back."""
        return b"".join(
            REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, i + 1, offset, length) for i in range(count)
        )

    def list_options(self, count: int) -> bytes:
        return self.conn.option(Opt.LIST) * count

    def alive(self, wait: float = 2.0) -> bool:
        """Whether the server still holds the connection (False once it hung up)."""
        self.sock.settimeout(wait)
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    return False
        except TimeoutError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)
