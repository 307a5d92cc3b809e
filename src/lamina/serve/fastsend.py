"""The reply side of a fast connection (``fastpath.FastConnection``): a batch's replies
leave in one ``sendmsg``; what the socket does not take waits, copied out of the shared
scratch buffer, and the connection reads no requests until it is gone."""

from __future__ import annotations

import socket
from typing import Final

from lamina.nbd.events import Buffer
from lamina.serve.fastbounds import Bounds

_IOV: Final = 512  # buffers per sendmsg (IOV_MAX is 1024)


class Replies(Bounds):
    """Sending what ``outbox`` holds (the requests' side is ``FastConnection``'s)."""

    sock: socket.socket
    fd: int
    outbox: list[Buffer]

    def _pause_reading(self) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Send what the outbox holds; what the socket does not take waits in ``pending``
        (copied out of the scratch buffer) and reading stops until it is gone."""
        outbox, self.outbox = self.outbox, []
        self._batch_bytes = 0
        if not outbox or self.closing:
            self.settle()
            return
        if not self.pending:
            rest = self._send(outbox)
            if rest is None:
                return
            outbox = rest
        if outbox:
            if not self.pending:
                self._pause_reading()
                self.shared.loop.add_writer(self.fd, self._writable)
                self._stall_watch()
            kept = [bytes(p) for p in outbox]  # views of the scratch buffer: copied
            self.pending += kept
            self._pending_bytes += sum(map(len, kept))
        self.settle()

    def _send(self, parts: list[Buffer]) -> list[Buffer] | None:
        """Send as much as the socket takes; returns the rest (None: the socket failed)."""
        while parts:
            batch = parts[:_IOV]
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                return parts
            except OSError:
                self.close()
                return None
            self._sent += sent
            if len(batch) == len(parts) and sent == sum(map(len, batch)):
                return []  # the common case: all of it went
            rest = _drop(batch, sent)
            parts = rest + parts[len(batch) :]
            if rest:
                return parts
        return parts

    def _writable(self) -> None:
        rest = self._send(self.pending)
        if rest is None:
            return
        self.pending = rest
        self._pending_bytes = sum(map(len, rest))
        self.settle()
        if rest:
            return
        self.shared.loop.remove_writer(self.fd)
        self._resume_reading()
        if self.end > self.start and self.reading:
            self._process()


def _drop(parts: list[Buffer], sent: int) -> list[Buffer]:
    """What is left of ``parts`` after the first ``sent`` bytes went out."""
    for i, part in enumerate(parts):
        if sent < len(part):
            rest = list(parts[i:])
            rest[0] = memoryview(part)[sent:]
            return rest
        sent -= len(part)
    return []
