"""The parent-worker channel of ``serve.workers``: an AF_UNIX SOCK_SEQPACKET socket pair
on the event loop; a message is a pickled tuple with at most one descriptor (SCM_RIGHTS)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Final

_MESSAGE: Final = 64 << 10
_PIECE: Final = _MESSAGE - 1  # of a message's pickle, in one datagram after its mark

Handler = Callable[[tuple[Any, ...], list[int]], None]


class Channel:
    """One end of a parent-worker channel on the event loop: pickled tuples, in order,
    each with at most one descriptor; sends queue while the peer is slow. A tuple larger
    than one datagram (a fleet's export names, a boot profile) goes in pieces: each
    datagram starts with ``+`` (more of it follows) or ``=`` (its last piece)."""

    def __init__(
        self, sock: socket.socket, on_message: Handler, on_eof: Callable[[], None]
    ) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._on_eof = on_eof
        self._queue: deque[tuple[bytes, list[int]]] = deque()
        self._pieces: list[bytes] = []  # of a large message, received so far
        self.closed = False
        self.loop.add_reader(sock.fileno(), self._readable)

    def send(self, message: tuple[Any, ...], fd: int | None = None) -> None:
        """Queue ``message``; ``fd`` is closed here once it has been sent."""
        if self.closed:
            if fd is not None:
                os.close(fd)
            return
        data = pickle.dumps(message)
        was_empty = not self._queue
        for start in range(0, len(data) - _PIECE, _PIECE):
            self._queue.append((b"+" + data[start : start + _PIECE], []))
        last = (len(data) - 1) // _PIECE * _PIECE
        self._queue.append((b"=" + data[last:], [] if fd is None else [fd]))
        if was_empty:
            self._writable()

    def _writable(self) -> None:
        while self._queue:
            data, fds = self._queue[0]
            try:
                socket.send_fds(self.sock, [data], fds)
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.sock.fileno(), self._writable)
                return
            except OSError:
                self.close()
                return
            self._queue.popleft()
            for fd in fds:
                os.close(fd)
        with contextlib.suppress(Exception):
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        while not self.closed:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, _MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self.close()
                self._on_eof()
                return
            if data[:1] == b"+":
                self._pieces.append(data[1:])
                continue
            if self._pieces:
                data, self._pieces = b"=" + b"".join(self._pieces) + data[1:], []
            self._on_message(pickle.loads(data[1:]), fds)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
        for _data, fds in self._queue:
            for fd in fds:
                os.close(fd)
        self._queue.clear()
        self.sock.close()
