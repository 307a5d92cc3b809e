"""asyncio adapters: an NBD server protocol and a small client, both thin shells around
the sans-I/O state machines. The server answers requests from the event loop when the
data is in memory and hands disk-bound work (chunk loads, fdatasync) to a thread pool.

With ``ServerTls`` the server requires TLS: after its ACK to NBD_OPT_STARTTLS it upgrades
its own transport (``loop.start_tls``, which uvloop implements too), so TLS lives in the
connection and works in whichever process or loop serves it. The client certificate
shown in the handshake picks the catalogue the connection negotiates against."""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol, cast

from lamina.errors import LaminaError, ProtocolError
from lamina.logs import event as log_event
from lamina.nbd.client import ChunkReceived, ClientConnection, Greeting, SimpleReplyReceived
from lamina.nbd.constants import PARTIAL_REPLIES, Cmd, CmdFlag, Errno, Info, Opt, Rep, ReplyType
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
    OptInfo,
    OptionReply,
    ReadData,
    Request,
    SimpleReply,
)
from lamina.nbd.negotiate import BASE_ALLOCATION_ID, Catalog, ExportInfo, check_request, negotiate
from lamina.nbd.server import Phase, ServerConnection

# Stop reading from a client whose replies pile up beyond this (it is not reading).
_HIGH_WATER = 64 << 20
# Logged as "refused": a name that is not served, or not to this client.
_REFUSALS = (Rep.ERR_POLICY, Rep.ERR_UNKNOWN)


class DeviceProvider(Catalog, Protocol):
    def open(self, name: str) -> BlockDevice: ...

    def release(self, name: str) -> None: ...


@dataclass(frozen=True)
class ServerTls:
    """TLS required on every connection (the spec's FORCEDTLS mode)."""

    context: ssl.SSLContext
    # The provider a client may use, given the certificate it showed (DER, verified by
    # the handshake; None for none), and who that is for the log. Blocking: runs on the
    # pool.
    authorize: Callable[[bytes | None], tuple[DeviceProvider, str]]
    handshake_timeout: float = 10.0


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
        self.peer = "?"
        self.stats = {"requests": 0, "bytes_read": 0, "bytes_written": 0, "errors": 0}
        self._transport: asyncio.Transport | None = None
        self._closing = False
        self._disconnecting = False
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
        self._transport.write(self.conn.initiate())

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        if self.conn.phase is not Phase.STARTTLS:
            self._pump()
        # else: bytes decrypted before the client is authorized wait for tls_established

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._pump()
        return False

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closing:
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
            name = self.export.name
            self.export = None
            self.device = None
            self.provider.release(name)

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
                    self._disconnect()
                    return
                elif not isinstance(event, ClientFlags):
                    self._option(event)  # type: ignore[arg-type]
        except ProtocolError as exc:
            self._hang_up(str(exc))

    def _disconnect(self) -> None:
        """The client is done: make its writes durable, then hang up. The flush runs on the
        pool like NBD_CMD_FLUSH: an fdatasync on the loop would stall every connection."""
        self._disconnecting = True
        device = self.device
        if device is None:
            self._hang_up("")
            return
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, device.flush)
        except RuntimeError:  # the pool is gone: the server is stopping
            device.flush()
            self._hang_up("")
            return

        def done(f: asyncio.Future[None]) -> None:
            exc = None if f.cancelled() else f.exception()
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
                self.device = self.provider.open(decision.export.name)
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


# -- client --------------------------------------------------------------------------------


class NbdClient:
    """A minimal asyncio NBD client (GO, structured replies, base:allocation), one request
    at a time. For lamina's own tools and tests; qemu and libnbd are the real clients."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = ClientConnection()
        self.size = 0
        self.flags = 0
        self._handle = 0

    @classmethod
    async def connect(cls, host: str, port: int, export: str, *, meta: bool = False) -> NbdClient:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        await client._handshake(export, meta)
        return client

    async def _next(self) -> Event:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                if isinstance(event, Closed):
                    raise ProtocolError("server closed the connection")
                assert isinstance(event, Event)
                return event
            self.conn.receive_data(await self.reader.read(1 << 20))

    async def _option(self, data: bytes) -> list[OptionReply]:
        self.writer.write(data)
        replies = []
        while True:
            event = await self._next()
            assert isinstance(event, OptionReply)
            replies.append(event)
            if event.reply not in PARTIAL_REPLIES:
                return replies

    async def _handshake(self, export: str, meta: bool) -> None:
        greeting = await self._next()
        assert isinstance(greeting, Greeting)
        self.writer.write(self.conn.client_flags())
        await self._option(self.conn.option(Opt.STRUCTURED_REPLY))
        if meta:
            await self._option(self.conn.set_meta_context(export, ("base:allocation",)))
        replies = await self._option(self.conn.go(export, (Info.BLOCK_SIZE,)))
        if replies[-1].reply != Rep.ACK:
            raise ProtocolError(
                f"export {export!r} refused: {replies[-1].data.decode(errors='replace')}"
            )
        for r in replies:
            if r.reply == Rep.INFO and struct.unpack(">H", r.data[:2])[0] == Info.EXPORT:
                self.size, self.flags = struct.unpack(">QH", r.data[2:12])

    async def request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes | None = None
    ) -> tuple[int, bytes]:
        """Send one request and wait for its whole reply: (error, data)."""
        self._handle += 1
        self.writer.write(self.conn.request(cmd, self._handle, offset, length, flags, data))
        out = bytearray()
        while True:
            event = await self._next()
            if isinstance(event, SimpleReplyReceived):
                return event.error, event.data
            assert isinstance(event, ChunkReceived)
            if event.kind == ReplyType.OFFSET_DATA:
                out += event.payload[8:]
            elif event.kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
                return struct.unpack(">I", event.payload[:4])[0], b""
            elif event.kind == ReplyType.BLOCK_STATUS:
                out += event.payload
            if event.flags & 1:
                return 0, bytes(out)

    async def close(self) -> None:
        self.writer.write(self.conn.request(Cmd.DISC, 0))
        await self.writer.drain()
        self.writer.close()
