"""What a fast connection (``fastpath.FastConnection``) may cost, and when it is dropped:
the bytes it holds (reads in flight and their replies the socket has not taken, write
payloads not yet applied) against its limit and its process's share of the server's
(``nbd.limits``), and the stall and idle timers. The rules are ``nbd.flow``'s, on the
fast path's own counters."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from lamina.logs import event as log_event
from lamina.nbd import ExportInfo
from lamina.nbd.batch import RequestReader, Tuple
from lamina.nbd.constants import Cmd
from lamina.nbd.events import Buffer
from lamina.nbd.flow import SMALL_READ
from lamina.serve.shared import Shared

_READ: Final = int(Cmd.READ)


class Bounds:
    """The budget and timer side of ``FastConnection`` (a ``limits.Debtor``)."""

    shared: Shared
    export: ExportInfo
    peer: str
    reader: RequestReader
    pending: list[Buffer]
    inflight: int
    closing: bool
    reading: bool
    start: int
    end: int

    def _bound(self, shared: Shared) -> None:
        self.budget = shared.budget
        self.limits = shared.budget.limits
        self.stash: list[Tuple] = []  # requests waiting for room in the budget
        self._reading_bytes = 0  # reads in flight on the pool
        self._writing = 0  # write payloads waiting for the writer thread
        self._batch_bytes = 0  # read data in the outbox
        self._pending_bytes = 0
        self._share = 0  # what the budget counts for this connection
        self._sent = 0  # reply bytes the socket took, ever
        self._stall: asyncio.TimerHandle | None = None
        self._stall_mark = 0
        self._idle: asyncio.TimerHandle | None = None
        self._last = shared.loop.time()

    # -- what the connection does ----------------------------------------------------

    def _run(self, requests: list[Tuple]) -> None:
        raise NotImplementedError

    def _process(self) -> None:
        raise NotImplementedError

    def _resume_reading(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- the budget (limits.Debtor) ------------------------------------------------

    def _unsent(self) -> int:
        """Bytes this connection holds: reads in flight and their replies not yet taken,
        writes not yet applied."""
        return self._reading_bytes + self._batch_bytes + self._pending_bytes + self._writing

    def _held_back(self, req: Tuple) -> bool:
        """Whether a request must wait for replies to be taken (as ``FlowControl``'s): a
        read that would pass a limit, anything once this connection is at its own."""
        cmd, length = req[0], req[4]
        own = self._unsent()
        if cmd != _READ:
            return own >= self.limits.reply_bytes
        if length > self.export.max_block:
            return False  # refused, not read
        if own and own + length > self.limits.reply_bytes:
            return True
        others = self.budget.used - self._share
        if not others or others + own + length <= self.limits.total_reply_bytes:
            return False
        return own > 0 or length > SMALL_READ

    def settle(self) -> None:
        if self.closing:
            return
        share = self._unsent()
        if share != self._share:
            self._share = share
            self.budget.set(self, share)
        if self.stash and not self._held_back(self.stash[0]):
            self.shared.loop.call_soon(self.wake)

    def wake(self) -> None:
        if self.closing or not self.stash:
            return
        requests, self.stash = self.stash, []
        self._run(requests)
        if not self.stash:
            self._resume_reading()
            if self.end > self.start and self.reading:
                self._process()

    # -- timeouts --------------------------------------------------------------------

    def _stall_watch(self) -> None:
        """Replies wait for the socket: the client has ``stall_timeout`` to take some."""
        if self._stall is None and self.limits.stall_timeout > 0:
            self._stall_mark = self._sent
            self._stall = self.shared.loop.call_later(self.limits.stall_timeout, self._stalled)

    def _stalled(self) -> None:
        self._stall = None
        if self.closing or not self.pending:
            return
        if self._sent != self._stall_mark:
            self._stall_watch()
            return
        limit = self.limits.stall_timeout
        reason = f"stalled: {self._pending_bytes} bytes of replies unread for {limit:g} s"
        self._drop("stalled", reason)

    def _idle_check(self) -> None:
        self._idle = None
        idle = self.limits.idle_timeout
        if self.closing or idle <= 0:
            return
        quiet = self.shared.loop.time() - self._last
        if self.inflight or self.pending or self.stash or quiet < idle:
            self._idle = self.shared.loop.call_later(max(idle - quiet, 0.1), self._idle_check)
            return
        self._drop("idle-timeout", f"no request for {idle:g} s")

    def _drop(self, what: str, reason: str) -> None:
        log_event(self.shared.log, what, logging.WARNING, client=self.peer, reason=reason)
        self.close()

    def _unbound(self) -> None:
        """The connection is closed: its timers stop, its share is given back."""
        self.stash.clear()
        for timer in (self._stall, self._idle):
            if timer is not None:
                timer.cancel()
        self.budget.forget(self)


def owned(req: Tuple) -> Tuple:
    """A request whose payload no longer points into the receive buffer."""
    data = req[5]
    return req if data is None else (*req[:5], memoryview(bytes(data)))
