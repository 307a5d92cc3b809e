"""Flow control of one NBD server connection (the base of ``aio.NbdServerProtocol``):
what it may hold, when it is read from, and when it is dropped.

The connection pulls events from its sans-I/O state machine only while its unsent
replies (being read, queued in a lane, or waiting in the transport) are under its limit
and the server's ``Budget`` has room; otherwise it stops reading from its socket, so the
client's requests wait in the kernel, and it is woken when replies drain (``settle``,
``wake``). Timers end a handshake that takes too long, a connection idle too long (when
that limit is on), and one whose client takes none of its replies for
``stall_timeout``. The NBD meaning of events is the subclass's: ``_option``,
``_request``, ``_disconnect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from typing import cast

from lamina.errors import ProtocolError
from lamina.logs import event as log_event
from lamina.nbd.constants import Cmd
from lamina.nbd.events import NEED_DATA, Buffer, ClientFlags, Closed, Disconnect, Event, Request
from lamina.nbd.limits import Budget, call_later
from lamina.nbd.server import Phase, ServerConnection

# Reads up to this size run while the server is over its reply budget, one per connection.
SMALL_READ = 128 << 10
# Over TLS, replies go to the TLS transport this much at a time, the rest waiting here:
# asyncio's TLS layer encrypts all it is given at once and hands all of it to the socket's
# transport, so a 32 MiB reply given whole was held four times over (two such readers
# took two worker processes to 486 MiB).
TLS_SLICE = 256 << 10
# TCP keepalive: probe after 30 s of silence, give up after 3 probes 10 s apart.
_KEEPALIVE = (30, 10, 3)


def _keepalive(sock: socket.socket | None) -> None:
    """Notice a client whose host died or whose link broke within about a minute: such a
    connection would otherwise hold its machine's disk (one writer) for hours."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPALIVE[0])
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE[1])
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPALIVE[2])


class FlowControl(asyncio.Protocol):
    """The transport side of one connection: budgets, timers, the event pump."""

    def __init__(self, conn: ServerConnection, budget: Budget, log: logging.Logger) -> None:
        self.conn = conn
        self.budget = budget
        self.limits = budget.limits
        self.log = log
        self.peer = "?"
        self._address: str | None = None  # counted in the budget's connections
        self._transport: asyncio.Transport | None = None
        self._raw: asyncio.Transport | None = None  # under a TLS transport: the socket's
        self._tls_queue: deque[memoryview] = deque()  # replies not yet given to TLS
        self._tls_queued = 0
        self._write_paused = False
        self._close_fed = False  # close once the TLS queue is given
        self._closing = False
        self._disconnecting = False
        self._holds = 0  # ``hold`` calls not yet undone
        # Replies produced while handling one batch of received bytes go out in one
        # gathered write: one send syscall per batch instead of per reply (a 4 KiB
        # random-write load spent 43% of its time in per-reply sends).
        self._out: list[Buffer] = []
        self._out_bytes = 0
        self._handed = 0  # reply bytes given to the transport, ever
        self._held = 0  # reply bytes being read and write payloads queued
        self._jobs = 0  # pool and lane jobs of this connection not finished
        self._option_busy = False  # a catalogue option is being answered on the pool
        self._waiting = False  # over a reply budget: not reading
        self._stashed: Request | None = None  # a read waiting for the server's budget
        self._reading = True
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_mark = 0
        self._last_request = 0.0

    # -- what the subclass answers ------------------------------------------------------

    def _option(self, event: Event) -> None:
        raise NotImplementedError

    def _request(self, req: Request) -> None:
        raise NotImplementedError

    def _disconnect(self, *, said_goodbye: bool = False) -> None:
        raise NotImplementedError

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        address = peer[0] if isinstance(peer, tuple) else self.peer
        if not self.budget.admit(address):
            log_event(self.log, "too-many-connections", logging.WARNING, client=self.peer)
            self._closing = True
            self._transport.abort()
            return
        self._address = address
        self._handshake_timer = call_later(self.limits.handshake_timeout, self._handshake_over)
        self._buffer_limits()
        _keepalive(transport.get_extra_info("socket"))
        greeting = self.conn.initiate()
        self._transport.write(greeting)
        self._handed += len(greeting)

    def _buffer_limits(self) -> None:
        assert self._transport is not None
        high = TLS_SLICE if self._raw is not None else self.limits.reply_bytes
        self._transport.set_write_buffer_limits(high=high, low=high // 4)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        if self.conn.phase is not Phase.STARTTLS:
            self._pump()
        # else: bytes decrypted before the client is authorized wait for tls_established

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._pump()
        # Hanging up is ours once a disconnect is under way: its flush (and, after
        # NBD_CMD_DISC, the end of the machine's boot) comes before the connection is lost.
        return self._disconnecting and not self._closing

    def pause_writing(self) -> None:
        self._write_paused = True
        self.settle()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._feed_tls()
        self.settle()

    def hold(self) -> None:
        """Stop reading this client's requests (its writes wait in the socket) until
        ``unhold``: a backup copies the disk at a flush point meanwhile."""
        self._holds += 1
        self._set_reading()

    def unhold(self) -> None:
        self._holds -= 1
        self._set_reading()

    def abort(self) -> None:
        """Drop the connection at once (server shutdown)."""
        if self._transport is not None:
            self._closing = True
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for timer in (self._handshake_timer, self._idle_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._tls_queue.clear()
        self._tls_queued = 0
        self.budget.forget(self)
        if self._address is not None:
            self.budget.leave(self._address)
            self._address = None

    # -- budget (limits.Debtor) ---------------------------------------------------------

    def _buffered(self) -> int:
        """Reply bytes given to the transport and not yet taken by the kernel (over TLS:
        waiting for the TLS layer, in it, and in the socket's transport under it)."""
        transport = self._transport
        size = transport.get_write_buffer_size() if transport is not None else 0
        if self._raw is not None:
            size += self._raw.get_write_buffer_size() + self._tls_queued
        return size

    def _unsent(self) -> int:
        """Reply bytes this connection holds: being produced, gathered, or in its
        transport's buffer."""
        return self._held + self._out_bytes + self._buffered()

    def _over(self) -> bool:
        """Whether this connection's own unsent replies stop it taking requests."""
        return self._unsent() >= self.limits.reply_bytes

    def _held_back(self, req: Request) -> bool:
        """Whether a read must wait until the replies before it are sent: it would take
        the connection or the server past its limit. A connection with nothing unsent
        may always run one read of its own size limit, and, while the server is at its
        limit, one small one: a booting VM's 4-128 KiB reads go on while large readers
        wait."""
        if req.cmd != Cmd.READ:
            return False  # writes are in memory already; the rest are small
        own = self._unsent()
        if own and own + req.length > self.limits.reply_bytes:
            return True
        used = self.budget.used
        if used <= own or used + req.length <= self.limits.total_reply_bytes:
            return False  # (alone on the server: even a read past the total may run)
        return own > 0 or req.length > SMALL_READ

    def _can_go(self) -> bool:
        return not self._over() and (self._stashed is None or not self._held_back(self._stashed))

    def settle(self) -> None:
        if self._closing:
            return
        self.budget.set(self, self._unsent())
        if self._waiting and self._can_go():
            asyncio.get_running_loop().call_soon(self.wake)
        if self._stall_timer is None and self._buffered():
            # Replies wait in the transport: the client has stall_timeout to take some.
            # (Whether or not it sends more: one unread read holds its share all along.)
            self._stall_mark = self._taken()
            self._stall_timer = call_later(self.limits.stall_timeout, self._stall_check)

    def _taken(self) -> int:
        """Reply bytes the client has taken (the kernel accepted them), ever."""
        return self._handed - self._buffered()

    def wake(self) -> None:
        if self._waiting and not self._closing:
            self._go_on()

    def _go_on(self) -> None:
        self._waiting = False
        if not self._closing:
            self._set_reading()
            self._pump()

    def _wait(self) -> None:
        """Over a budget: read nothing more until there is room (``wake``/``settle``)."""
        self._waiting = True
        self._set_reading()
        self.budget.wait(self)

    def _stall_check(self) -> None:
        self._stall_timer = None
        waiting = self._buffered()
        if self._closing or not waiting:
            return
        if self._taken() == self._stall_mark:
            self._drop(
                "stalled",
                f"stalled: {waiting} bytes of replies unread for {self.limits.stall_timeout:g} s",
            )
            return
        self._stall_mark = self._taken()
        self._stall_timer = call_later(self.limits.stall_timeout, self._stall_check)

    def _set_reading(self) -> None:
        transport = self._transport
        if transport is None or self.conn.phase is Phase.STARTTLS:
            return
        want = not (self._closing or self._waiting or self._option_busy or self._holds)
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    # -- timeouts -----------------------------------------------------------------------

    def _handshake_over(self) -> None:
        self._handshake_timer = None
        if not self._closing and self.conn.phase is not Phase.TRANSMISSION:
            limit = self.limits.handshake_timeout
            self._drop("handshake-timeout", f"no export chosen within {limit:g} s")

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._closing:
            return
        idle = self.limits.idle_timeout
        quiet = asyncio.get_running_loop().time() - self._last_request
        if self._jobs or self._held or self._buffered() or quiet < idle:
            self._idle_timer = call_later(max(idle - quiet, 0.1), self._idle_check)
            return
        self._drop("idle-timeout", f"no request for {idle:g} s")

    def _drop(self, what: str, reason: str) -> None:
        log_event(self.log, what, logging.WARNING, client=self.peer, reason=reason)
        self._hang_up("")
        if self._transport is not None:
            self._transport.abort()  # what it did not read is thrown away

    # -- event pump ---------------------------------------------------------------------

    def _send(self, event: Event) -> None:
        parts = self.conn.send_parts(event)
        self._out += parts
        self._out_bytes += sum(map(len, parts))

    def _flush_out(self) -> None:
        if self._out and self._transport is not None and not self._closing:
            if self._raw is not None:
                self._tls_queue += (memoryview(p).cast("B") for p in self._out)
                self._tls_queued += self._out_bytes
                self._feed_tls()
            else:
                self._transport.writelines(self._out)
            self._handed += self._out_bytes
        self._out = []
        self._out_bytes = 0

    def _feed_tls(self) -> None:
        """Give the TLS transport queued replies, a slice at a time, until it says it has
        enough (``pause_writing``); ``resume_writing`` asks for more."""
        transport = self._transport
        if transport is None or (self._closing and not self._close_fed):
            return
        queue = self._tls_queue
        while queue and not self._write_paused:
            part = queue.popleft()
            if len(part) > TLS_SLICE:
                queue.appendleft(part[TLS_SLICE:])
                part = part[:TLS_SLICE]
            elif queue and len(part) + len(queue[0]) <= TLS_SLICE:
                # Small replies (a header, 4 KiB of data) go together: the TLS layer
                # makes a record, and a send, of each write (4 KiB random reads: 2 of
                # each per reply).
                parts = [part]
                size = len(part)
                while queue and size + len(queue[0]) <= TLS_SLICE:
                    parts.append(queue.popleft())
                    size += len(parts[-1])
                part = memoryview(b"".join(parts))
            self._tls_queued -= len(part)
            transport.write(part)
        if self._close_fed and not queue:
            self._close_fed = False
            transport.close()

    def _hang_up(self, reason: str) -> None:
        self._flush_out()
        if not self._closing and self._transport is not None:
            if reason:
                log_event(self.log, "hang-up", logging.WARNING, client=self.peer, reason=reason)
            self._closing = True
            if self._tls_queue:
                self._close_fed = True  # the replies before the hang-up go first
            else:
                self._transport.close()

    def _pump(self) -> None:
        try:
            self._pump_events()
        finally:
            self._flush_out()
            self.settle()

    def _pump_events(self) -> None:
        try:
            while not (self._closing or self._disconnecting or self._option_busy):
                if self._over():
                    self._wait()
                    return
                event, self._stashed = self._stashed or self.conn.next_event(), None
                if event is NEED_DATA:
                    return
                if isinstance(event, Request):
                    if self._held_back(event):
                        self._stashed = event
                        self._wait()
                        return
                    self._request(event)
                elif isinstance(event, Disconnect | Closed):
                    self._disconnect(said_goodbye=isinstance(event, Disconnect))
                    return
                elif not isinstance(event, ClientFlags):
                    self._option(event)  # type: ignore[arg-type]
        except ProtocolError as exc:
            self._hang_up(str(exc))
