"""The NBD side of one serving process: handshakes, then the fast path.

Every connection starts in ``NbdServerProtocol`` (the handshake, and TLS when it is
negotiated there). Three things change around it here:

- Opening an export (a database query, a delta's lock and map, its image version's chunk
  index) runs on a thread, not on the event loop: a boot storm opens a hundred machines
  at once. The GO waits for it; the state machine produces no event meanwhile.
- A plain connection whose GO succeeded moves to ``FastConnection`` on a duplicate of its
  socket descriptor; the transport is then dropped without closing the connection.
- A machine's delta has one writer, so a machine is served by one process. When its
  delta is held by a sibling process, the connection (before the GO is answered) goes
  to that process through the ``Hub`` with its handshake state; each process tries at
  most once, then the GO gets the error reply (the delta is held by something else: a
  commit, a reset). A TLS connection cannot move (its session lives in this process)
  and gets the error reply at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lamina.delta.file import copy_files
from lamina.errors import Conflict
from lamina.home import Home
from lamina.logs import event as log_event
from lamina.manager.nbdtotals import NbdTotals
from lamina.names import MACHINE_PREFIX
from lamina.nbd import Phase, ServerConnection
from lamina.nbd.aio import NbdServerProtocol, Opened, ServerTls
from lamina.nbd.events import Event
from lamina.nbd.flow import FlowControl
from lamina.nbd.lanes import Lanes
from lamina.nbd.limits import Budget, Limits
from lamina.serve.fastpath import FastConnection
from lamina.serve.filedevices import FileCatalog
from lamina.serve.shared import Shared

# A machine's disk changes hands while connections come and go: the holder a connection was
# sent to may have closed it, and a sibling opened it, meanwhile. Moves past the first
# round wait a little (10 ms, then 20 ms ... up to 100 ms), so a connection is refused
# only after about 0.7 s of finding the disk held elsewhere (two workers), not at the
# first race between one worker closing the disk and another opening it.
MOVES = 12
MOVE_WAIT = 0.01
MOVE_WAIT_MAX = 0.1

if TYPE_CHECKING:
    from lamina.serve.options import ServeOptions
    from lamina.serve.records import Records


class Hub(Protocol):
    """The way to sibling processes (the parent routes)."""

    def hand_over(self, export: str, fd: int, state: bytes, address: str) -> None:
        """Send connection ``fd`` (closed afterwards) to the process holding ``export``."""
        ...

    def left(self, address: str) -> None:
        """A connection from ``address`` ended here (the parent counts them)."""
        ...

    def opened(self, export: str) -> None: ...

    def closed(self, export: str) -> None: ...


@dataclass
class Resumed:
    """A handshake handed over by a sibling, waiting for its GO to be answered here."""

    conn: ServerConnection
    event: Event
    peer: str
    hops: int


class WorkerProtocol(NbdServerProtocol):
    def __init__(self, service: NbdService, resumed: Resumed | None = None) -> None:
        super().__init__(
            service.catalog,
            service.pool,
            service.log,
            on_close=service.forget,
            tls=service.tls,
            budget=service.budget,
            handshake_executor=service.handshakes,
            lanes=service.lanes,
        )
        self.service = service
        self.catalog = service.catalog
        self.resumed = resumed
        self.moved = False  # the socket now belongs to the fast path or a sibling

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.resumed is None:
            super().connection_made(transport)
            return
        tcp: asyncio.Transport = transport  # type: ignore[assignment]
        self._transport = tcp
        self._buffer_limits()
        self.conn, self.peer = self.resumed.conn, self.resumed.peer
        # admitted by the parent already; counted here so that it leaves here
        self._address = self.peer.rpartition(":")[0]
        self.budget.admit(self._address)
        event = self.resumed.event
        asyncio.get_running_loop().call_soon(self._option, event)

    def connection_lost(self, exc: Exception | None) -> None:
        address = self._address
        if not self.moved:
            super().connection_lost(exc)
            if address is not None:
                self.service.left(address)
            return
        # timers and budget; the address too, unless the fast path answers for it now
        FlowControl.connection_lost(self, exc)
        if self.on_close is not None:
            self.on_close(self)

    # -- GO: opened off the loop by NbdServerProtocol -------------------------------

    def _decided(self, event: Event, opened: Opened) -> None:
        export = opened.decision.export
        if (
            export is not None
            and opened.device is None
            and isinstance(opened.error, Conflict)
            and self._can_move(export.name)
        ):
            rounds = self._hops() - self.service.siblings
            if rounds < 0:  # the first round: at once
                self._hand_over_or_refuse(event, opened)
            else:
                wait = min(MOVE_WAIT * (rounds + 1), MOVE_WAIT_MAX)
                loop = asyncio.get_running_loop()
                loop.call_later(wait, self._hand_over_or_refuse, event, opened)
            return
        super()._decided(event, opened)
        opened_machine = export is not None and export.name.startswith(MACHINE_PREFIX)
        if self.device is not None and opened_machine:
            assert export is not None
            self.service.note_open(export.name)

    # -- leaving this protocol ---------------------------------------------------------

    def _plain(self) -> bool:
        return self._transport is not None and self._transport.get_extra_info("ssl_object") is None

    def _hops(self) -> int:
        return self.resumed.hops if self.resumed is not None else 0

    def _can_move(self, name: str) -> bool:
        return (
            self.service.hub is not None
            and name.startswith(MACHINE_PREFIX)
            and self._hops() < max(MOVES, self.service.siblings)
            and self._plain()
        )

    def _hand_over_or_refuse(self, event: Event, opened: Opened) -> None:
        """Move the connection on; if it cannot move now (replies still queued here), the
        GO is answered here with the refusal."""
        export = opened.decision.export
        assert export is not None
        if self._closing or self._hand_over(export.name, event):
            return
        super()._decided(event, opened)

    def _take_socket(self) -> socket.socket | None:
        """A duplicate of the connection's socket; the transport is dropped (closing the
        original descriptor does not end the connection while the duplicate is open)."""
        transport = self._transport
        if transport is None or transport.get_write_buffer_size():
            return None
        raw = transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        self.moved = True
        self._closing = True  # nothing more is read or answered here
        transport.pause_reading()
        transport.abort()
        return sock

    def _hand_over(self, name: str, event: Event) -> bool:
        """Send the connection to the sibling holding ``name`` (False: replies are still
        queued here, so the GO is answered here)."""
        hub = self.service.hub
        assert hub is not None
        hops = self._hops()
        sock = self._take_socket()
        if sock is None:
            return False
        state = pickle.dumps(Resumed(self.conn, event, self.peer, hops + 1))
        log_event(self.log, "hand-over", client=self.peer, export=name)
        hub.hand_over(name, sock.detach(), state, self._address or "")
        return True

    def _pump(self) -> None:
        super()._pump()
        if (
            not self.moved
            and not self._closing
            and self.device is not None
            and self.export is not None
            and self.conn.phase is Phase.TRANSMISSION
            and not self.stats["requests"]  # nothing answered (or in flight) the slow way
            and self._plain()
        ):
            self._to_fast_path()

    def _to_fast_path(self) -> None:
        sock = self._take_socket()
        if sock is None:
            asyncio.get_running_loop().call_later(0.001, self._pump)  # the GO reply is queued
            return
        assert self.device is not None and self.export is not None
        name, device = self.export.name, self.device
        leftover = self.conn.unconsumed()
        address, self._address = self._address, None
        fast = FastConnection(
            self.service.shared,
            sock,
            self.conn,
            device,
            self.export,
            self.peer,
            release=lambda ended: self.provider.release(name, device, ended=ended),
            gone=lambda: self.service.gone(address),
        )
        if leftover:
            fast.feed(leftover)


class NbdService:
    """Everything that serves NBD in one process: catalog, threads, connections."""

    def __init__(
        self,
        home: Home,
        log: logging.Logger,
        *,
        io_threads: int = 8,
        hub: Hub | None = None,
        options: ServeOptions | None = None,
        siblings: int = 0,
        records: Records | None = None,
        index: int = 0,
    ) -> None:
        """``records``: where the database's answers come from (else the home's);
        ``index``: this process's among the server's ``siblings + 1``."""
        self.home = home
        self.log = log
        self.hub = hub
        self.siblings = siblings  # other processes a connection may be handed to
        self.catalog = FileCatalog(
            home, on_close=self._device_closed, records=records, share=(index, siblings + 1)
        )
        self.budget = Budget(_process_limits(options, siblings))
        self.catalog.server = options.server_name if options is not None else None
        self.tls: ServerTls | None = None
        if options is not None and options.tls:
            from lamina.serve.tls import tls_setup

            # (a worker process loads what its parent issued)
            self.tls = tls_setup(home, options, self.catalog, issue=hub is None).nbd
        self.pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="io")
        # Handshake options read the database: two threads of their own, so that a flood
        # of them waits for these while reads and writes go on elsewhere.
        self.handshakes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="handshake")
        self.lanes = Lanes(max(2, io_threads // 2))  # TLS connections' writes, in order
        self.loop = asyncio.get_running_loop()
        self.shared = Shared(self.loop, self.pool, log, self.budget)
        self.protocols: set[NbdServerProtocol] = set()
        self.on_change: Callable[[], None] | None = None  # connections came or went
        self.connections = 0  # handshakes started here (handed-over ones included)

    def protocol(self, resumed: Resumed | None = None) -> WorkerProtocol:
        self.connections += 1
        proto = WorkerProtocol(self, resumed)
        self.protocols.add(proto)
        return proto

    def forget(self, proto: NbdServerProtocol) -> None:
        self.protocols.discard(proto)
        if proto.export is not None and not getattr(proto, "moved", False):
            self.shared.meter.record(proto.export.name, proto.stats)
        if self.on_change is not None:
            self.on_change()

    async def accept(self, sock: socket.socket, state: bytes | None = None) -> None:
        """Serve a connection accepted elsewhere (``state``: a handed-over handshake)."""
        resumed = pickle.loads(state) if state else None  # from our parent only
        await self.loop.connect_accepted_socket(lambda: self.protocol(resumed), sock)

    def counters(self) -> dict[str, int]:
        """What this process did: connections, chunks it made ready (see ImageFiles)."""
        return {"connections": self.connections, "hydrated": self.catalog.hydrations()}

    def left(self, address: str) -> None:
        """A connection from ``address`` ended in this process."""
        if self.hub is not None:
            self.hub.left(address)

    def gone(self, address: str | None) -> None:
        """A fast connection from ``address`` ended."""
        if address is not None:
            self.budget.leave(address)
            self.left(address)

    def totals(self) -> NbdTotals:
        """This process's NBD counters, live connections included (see serve.meter)."""
        live = [(p.export.name, p.stats, p.peer) for p in self.protocols if p.export is not None]
        live += [(c.export.name, c.stats, c.peer) for c in self.shared.connections]
        return self.shared.meter.snapshot(live)

    async def copy_delta(self, export: str, src: Path, dest: Path) -> bool:
        """Copy the delta of machine export ``export`` into ``dest`` at a flush point, if
        this process has it open (False: it has not). Its connections take no requests
        meanwhile, and no new one may start writing it; the copy runs on the pool once the
        writes taken before are done (see ``serve.control``)."""
        device = self.catalog.opened(export)
        if device is None:
            return False
        with self.catalog.copying(export):
            held: list[NbdServerProtocol | FastConnection] = [
                c for c in self.shared.connections if c.export.name == export
            ]
            held += [p for p in self.protocols if p.export is not None and p.export.name == export]
            for conn in held:
                conn.hold()
            done: asyncio.Future[None] = self.loop.create_future()

            def copy() -> None:
                device.flush()
                copy_files(src, dest)

            def finished(error: BaseException | None) -> None:
                if not done.done():
                    done.set_exception(error) if error else done.set_result(None)

            try:
                self.shared.writer.after(copy, finished)
                await done
            except (OSError, ValueError):
                if self.catalog.opened(export) is device:
                    raise
                return False  # closed meanwhile by its last client: copied as a closed one
            finally:
                for conn in held:
                    conn.unhold()
        return True

    def note_open(self, name: str) -> None:
        self.shared.meter.opened(name)
        if self.hub is not None:
            self.hub.opened(name)

    def _device_closed(self, name: str) -> None:
        """From any thread: the last user of ``name`` closed it."""
        if self.hub is not None and name.startswith(MACHINE_PREFIX):
            self.loop.call_soon_threadsafe(self.hub.closed, name)

    async def close(self) -> None:
        """Drop every connection, then flush and close every device."""
        for proto in list(self.protocols):
            proto.abort()
        for conn in list(self.shared.connections):
            conn.close()
        for _ in range(100):  # releases run on the device queues: wait for them
            if not self.catalog.open_count():
                break
            await asyncio.sleep(0.01)
        await self.loop.run_in_executor(None, self.shared.writer.stop)
        await self.loop.run_in_executor(None, self.handshakes.shutdown, True)
        await self.loop.run_in_executor(None, self.lanes.close)
        await self.loop.run_in_executor(None, self.pool.shutdown, True)
        self.catalog.close_all()


def _process_limits(options: ServeOptions | None, siblings: int) -> Limits:
    """The limits from the options (else the environment); with sibling processes, each
    has its share of the server's total of unsent replies."""
    from lamina.serve.options import serve_limits

    limits = serve_limits(options)
    if not siblings:
        return limits
    share = max(limits.reply_bytes, limits.total_reply_bytes // (siblings + 1))
    return replace(limits, total_reply_bytes=share)
