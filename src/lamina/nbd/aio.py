"""The asyncio adapter of the NBD server: a thin shell around the sans-I/O state machine.
It answers requests from the event loop when the data is in memory and hands disk-bound
work (chunk loads, fdatasync) to a thread pool.

With ``ServerTls`` the server requires TLS: after its ACK to NBD_OPT_STARTTLS it upgrades
its own transport (``loop.start_tls``, which uvloop implements too), so TLS lives in the
connection and works in whichever process or loop serves it. The client certificate
shown in the handshake picks the catalogue the connection negotiates against."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Protocol, cast

from lamina.errors import LaminaError, ProtocolError
from lamina.logs import event as log_event
from lamina.nbd.constants import Cmd, CmdFlag, Errno, Opt, Rep
from lamina.nbd.device import BlockDevice
from lamina.nbd.events import (
    NEED_DATA,
    BlockStatus,
    Buffer,
    ClientFlags,
    Closed,
    Disconnect,
    ErrorReply,
    Event,
    OptExportName,
    OptInfo,
    OptionReply,
    ReadData,
    Request,
    SimpleReply,
)
from lamina.nbd.negotiate import (
    BASE_ALLOCATION_ID,
    Catalog,
    ExportInfo,
    check_request,
    negotiate,
    opening,
)
from lamina.nbd.server import Phase, ServerConnection

# Stop reading from a client whose replies pile up beyond this (it is not reading).
_HIGH_WATER = 64 << 20
# Logged as "refused": a name that is not served, or not to this client.
_REFUSALS = (Rep.ERR_POLICY, Rep.ERR_UNKNOWN)
# TCP keepalive: probe after 30 s of silence, give up after 3 probes 10 s apart.
_KEEPALIVE = (30, 10, 3)


class DeviceProvider(Catalog, Protocol):
    def open(self, name: str, client: str) -> BlockDevice:
        """The device behind export ``name`` for ``client`` (its address, for the log). Its
        ``info`` may narrow the export's: read-only for a second writer of one disk."""
        ...

    def release(self, name: str, device: BlockDevice, *, ended: bool) -> None:
        """The connection that opened ``device`` is gone; ``ended``: it said NBD_CMD_DISC
        and its writes were flushed (qemu does so at power-off)."""
        ...


@dataclass(frozen=True)
class ServerTls:
    """TLS required on every connection (the spec's FORCEDTLS mode)."""

    context: ssl.SSLContext
    # The provider a client may use, given the certificate it showed (DER, verified by
    # the handshake; None for none), and who that is for the log. Blocking: runs on the
    # pool.
    authorize: Callable[[bytes | None], tuple[DeviceProvider, str]]
    handshake_timeout: float = 10.0


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


class NbdServerProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(
        self,
        provider: DeviceProvider,
        executor: Executor,
        log: logging.Logger,
        on_close: Callable[[NbdServerProtocol], None] | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        self.provider = provider
        self.on_close = on_close
        self.executor = executor
        self.log = log
        self.tls = tls
        self.conn = ServerConnection(tls_required=tls is not None)
        self.client = "-"  # who the TLS client certificate names
        self._upgrade: asyncio.Task[None] | None = None  # the STARTTLS upgrade under way
        self.device: BlockDevice | None = None
        self.export: ExportInfo | None = None
        self._ended = False  # NBD_CMD_DISC received and the flush after it done
        self.peer = "?"
        self.stats = {"requests": 0, "bytes_read": 0, "bytes_written": 0, "errors": 0}
        self._transport: asyncio.Transport | None = None
        self._closing = False
        self._disconnecting = False
        self._holds = 0  # ``hold`` calls not yet undone
        self._write_paused = False  # the transport's buffer is full
        # Replies produced while handling one batch of received bytes go out in one
        # gathered write: one send syscall per batch instead of per reply (a 4 KiB
        # random-write load spent 43% of its time in per-reply sends).
        self._out: list[Buffer] = []

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._transport.set_write_buffer_limits(high=_HIGH_WATER)
        _keepalive(transport.get_extra_info("socket"))
        self._transport.write(self.conn.initiate())

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
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume_reading()

    def hold(self) -> None:
        """Stop reading this client's requests (its writes wait in the socket) until
        ``unhold``: a backup copies the disk at a flush point meanwhile."""
        self._holds += 1
        if self._transport is not None and not self._closing:
            self._transport.pause_reading()

    def unhold(self) -> None:
        self._holds -= 1
        self._resume_reading()

    def _resume_reading(self) -> None:
        if self._transport is not None and not (self._closing or self._holds or self._write_paused):
            self._transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection at once (server shutdown)."""
        if self._transport is not None:
            self._closing = True
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self.on_close is not None:
            self.on_close(self)
            self.on_close = None
        if self.export is not None:
            log_event(
                self.log, "disconnect", client=self.peer, export=self.export.name, **self.stats
            )
            name, device = self.export.name, self.device
            self.export = None
            self.device = None
            if device is not None:
                self.provider.release(name, device, ended=self._ended)

    # -- event pump ---------------------------------------------------------------------

    def _send(self, event: Event) -> None:
        self._out += self.conn.send_parts(event)

    def _flush_out(self) -> None:
        if self._out and self._transport is not None and not self._closing:
            self._transport.writelines(self._out)
        self._out = []

    def _hang_up(self, reason: str) -> None:
        self._flush_out()
        if not self._closing and self._transport is not None:
            if reason:
                log_event(self.log, "hang-up", logging.WARNING, client=self.peer, reason=reason)
            self._closing = True
            self._transport.close()

    def _pump(self) -> None:
        try:
            self._pump_events()
        finally:
            self._flush_out()

    def _pump_events(self) -> None:
        try:
            while not self._closing and not self._disconnecting:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    return
                if isinstance(event, Request):
                    self._request(event)
                elif isinstance(event, Disconnect | Closed):
                    self._disconnect(said_goodbye=isinstance(event, Disconnect))
                    return
                elif not isinstance(event, ClientFlags):
                    self._option(event)  # type: ignore[arg-type]
        except ProtocolError as exc:
            self._hang_up(str(exc))

    def _disconnect(self, *, said_goodbye: bool) -> None:
        """The client is done: make its writes durable, then hang up. The flush runs on the
        pool like NBD_CMD_FLUSH: an fdatasync on the loop would stall every connection.
        Only a client that said NBD_CMD_DISC ended its session cleanly; end of stream
        alone is a crash or a lost link, after which it may come back."""
        self._disconnecting = True
        device = self.device
        if device is None:
            self._hang_up("")
            return
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, device.flush)
        except RuntimeError:  # the pool is gone: the server is stopping
            device.flush()
            self._ended = said_goodbye
            self._hang_up("")
            return

        def done(f: asyncio.Future[None]) -> None:
            exc = None if f.cancelled() else f.exception()
            self._ended = said_goodbye and exc is None and not f.cancelled()
            self._hang_up(f"flush at disconnect failed: {exc}" if exc is not None else "")

        future.add_done_callback(done)

    def _option(self, event: Event) -> None:
        decision = negotiate(event, self.provider, self.conn)
        if decision.export is not None:
            # Open before the reply that starts transmission: a device that cannot be
            # opened (its delta locked by a commit or reset) is then an error the client
            # can read after NBD_OPT_GO, not a hang-up. NBD_OPT_EXPORT_NAME cannot fail
            # politely: the spec says hang up.
            try:
                self.device = self.provider.open(decision.export.name, self.peer)
            except (LaminaError, OSError) as exc:
                if isinstance(event, OptInfo):
                    log_event(
                        self.log,
                        "refused",
                        logging.WARNING,
                        client=self.peer,
                        export=decision.export.name,
                        reason=str(exc),
                    )
                    message = f"cannot open {decision.export.name}: {exc}".encode()
                    self._send(OptionReply(Opt.GO, Rep.ERR_UNKNOWN, message))
                else:
                    self._hang_up(f"cannot open {decision.export.name}: {exc}")
                return
            if self.device.info.read_only != decision.export.read_only:
                # the device decides: a second writer's view is read-only (and the lookup
                # before it may have been answered while another client wrote)
                assert isinstance(event, OptExportName | OptInfo)
                ro = self.device.info.read_only
                decision = opening(event, replace(decision.export, read_only=ro))
            self.export = decision.export
        for reply in decision.replies:
            self._send(reply)
            if isinstance(reply, OptionReply) and reply.reply in _REFUSALS:
                log_event(
                    self.log,
                    "refused",
                    logging.WARNING,
                    client=self.peer,
                    credential=self.client,
                    export=getattr(event, "name", None),
                    reason=reply.data.decode(errors="replace"),
                )
        if self.conn.phase is Phase.STARTTLS and self._transport is not None:
            # Not a byte more on the plain transport: the client's TLS hello, sent once
            # it reads the ACK, belongs to the TLS layer start_tls puts in between.
            self._transport.pause_reading()
            self._upgrade = asyncio.get_running_loop().create_task(self._start_tls())
        if decision.export is not None:
            log_event(
                self.log,
                "connect",
                client=self.peer,
                credential=self.client,
                export=decision.export.name,
                structured=self.conn.structured,
                size=decision.export.size,
            )
        if decision.hang_up:
            self._hang_up(decision.reason)

    async def _start_tls(self) -> None:
        assert self.tls is not None and self._transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self._transport,
                self,
                self.tls.context,
                server_side=True,
                ssl_handshake_timeout=self.tls.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, RuntimeError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            log_event(
                self.log, "tls-refused", logging.WARNING, client=self.peer, reason=str(reason)
            )
            self._abort_plain()
            return
        if transport is None or self._closing:
            return
        self._transport = transport
        self._transport.set_write_buffer_limits(high=_HIGH_WATER)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            self.provider, self.client = await loop.run_in_executor(
                self.executor, self.tls.authorize, der
            )
        except (LaminaError, OSError) as exc:
            self._hang_up(f"cannot authorize the client: {exc}")
            return
        log_event(self.log, "tls", logging.DEBUG, client=self.peer, credential=self.client)
        self.conn.tls_established()
        self._pump()  # what the client sent since the handshake

    def _abort_plain(self) -> None:
        """The TLS handshake failed: drop the socket (no NBD reply can reach the client)."""
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        if self.on_close is not None:
            self.on_close(self)
            self.on_close = None

    # -- transmission -------------------------------------------------------------------

    def _request(self, req: Request) -> None:
        assert self.device is not None and self.export is not None
        self.stats["requests"] += 1
        error, message = check_request(req, self.export, self.conn)
        if error:
            self._error(req, error, message)
            return
        try:
            self._dispatch(req, self.device)
        except PermissionError as exc:
            self._error(req, Errno.EPERM, str(exc))
        except (OSError, LaminaError) as exc:
            self._error(req, Errno.EIO, str(exc))

    def _dispatch(self, req: Request, device: BlockDevice) -> None:
        cmd = req.cmd
        if cmd == Cmd.READ:
            if device.would_block(req.offset, req.length):
                self._offload(
                    req,
                    lambda: device.prefetch(req.offset, req.length),
                    lambda: self._read(req, device),
                )
            else:
                self._read(req, device)
        elif cmd == Cmd.WRITE:
            assert req.data is not None
            device.write(req.offset, req.data, bool(req.flags & CmdFlag.FUA))
            self.stats["bytes_written"] += req.length
            self._send(SimpleReply(req.handle))
        elif cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
            # TRIM is advisory; dropping the data to zeros is one valid way to honour it.
            device.write_zeroes(req.offset, req.length, bool(req.flags & CmdFlag.FUA))
            self._send(SimpleReply(req.handle))
        elif cmd == Cmd.FLUSH:
            self._offload(req, device.flush, lambda: self._send(SimpleReply(req.handle)))
        elif cmd == Cmd.CACHE:
            self._offload(
                req,
                lambda: device.prefetch(req.offset, req.length),
                lambda: self._send(SimpleReply(req.handle)),
            )
        elif cmd == Cmd.BLOCK_STATUS:
            self._block_status(req, device)

    def _read(self, req: Request, device: BlockDevice) -> None:
        segments = device.read(req.offset, req.length)
        self.stats["bytes_read"] += req.length
        self._send(ReadData(req.handle, req.offset, segments))

    def _block_status(self, req: Request, device: BlockDevice) -> None:
        extents = device.extents(req.offset, req.length)
        if req.flags & CmdFlag.REQ_ONE:
            extents = extents[:1]
        self._send(BlockStatus(req.handle, BASE_ALLOCATION_ID, extents))

    def _offload(self, req: Request, work: Callable[[], None], then: Callable[[], None]) -> None:
        future = asyncio.get_running_loop().run_in_executor(self.executor, work)

        def done(f: asyncio.Future[None]) -> None:
            if self._closing:
                return
            exc = f.exception()
            if exc is not None:
                self._error(req, Errno.EIO, str(exc))
                self._flush_out()
                return
            try:
                then()
            except (OSError, LaminaError) as err:
                self._error(req, Errno.EIO, str(err))
            self._flush_out()

        future.add_done_callback(done)

    def _error(self, req: Request, error: Errno, message: str) -> None:
        self.stats["errors"] += 1
        log_event(
            self.log,
            "request-error",
            logging.INFO,
            client=self.peer,
            export=self.export.name if self.export else None,
            command=req.cmd,
            offset=req.offset,
            length=req.length,
            error=error.name,
            message=message,
        )
        self._send(ErrorReply(req.handle, error, message))
