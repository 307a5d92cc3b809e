"""The asyncio adapter of the NBD server: a thin shell around the sans-I/O state machine.

The event loop only parses, answers from memory and sends. Everything that may wait for
a disk goes to thread pools: handshake options that ask the catalogue (a database) and
open devices, on ``handshake_executor``; reads that need chunks or touch a delta, on
``executor``, each on its own; writes in one serial lane per connection, batched (every
write received in one go is one pool job). Replies are counted while they are produced and
while they wait to be sent, against the connection's and the server's ``Budget``: past
either limit the connection is not read from (its requests wait in the kernel), and a
client that takes none of its replies for ``stall_timeout`` is dropped.

With ``ServerTls`` the server requires TLS: after its ACK to NBD_OPT_STARTTLS it upgrades
its own transport (``loop.start_tls``, which uvloop implements too), so TLS lives in the
connection and works in whichever process or loop serves it. The client certificate
shown in the handshake picks the catalogue the connection negotiates against."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, Protocol

from lamina.errors import LaminaError
from lamina.logs import event as log_event
from lamina.nbd.constants import Cmd, CmdFlag, Errno, Opt, Rep
from lamina.nbd.device import BlockDevice
from lamina.nbd.events import (
    BlockStatus,
    ErrorReply,
    Event,
    OptExportName,
    OptInfo,
    OptionReply,
    OptList,
    OptMetaContext,
    ReadData,
    Request,
    SimpleReply,
)
from lamina.nbd.flow import FlowControl
from lamina.nbd.lanes import Lane, Lanes
from lamina.nbd.limits import Budget, call_later
from lamina.nbd.negotiate import (
    BASE_ALLOCATION_ID,
    Catalog,
    Decision,
    ExportInfo,
    check_request,
    negotiate,
    opening,
)
from lamina.nbd.server import Phase, ServerConnection

# Options answered from the catalogue, which may read a database: off the loop.
_CATALOG_OPTIONS = (OptInfo, OptList, OptMetaContext, OptExportName)
_DEVICE_ERRORS = (LaminaError, OSError)
_WRITES = (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM)


# The most one NBD_CMD_BLOCK_STATUS reply describes (65,536 delta blocks: about 5 ms).
BLOCK_STATUS_SPAN = 256 << 20
# Logged as "refused": a name that is not served, or not to this client.
_REFUSALS = (Rep.ERR_POLICY, Rep.ERR_UNKNOWN)


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


@dataclass(frozen=True, slots=True)
class Opened:
    """What a catalogue option came to, worked out on the handshake pool."""

    decision: Decision
    device: BlockDevice | None = None
    error: Exception | None = None  # the device of decision.export could not be opened


class NbdServerProtocol(FlowControl):
    """One client connection."""

    def __init__(
        self,
        provider: DeviceProvider,
        executor: Executor,
        log: logging.Logger,
        on_close: Callable[[NbdServerProtocol], None] | None = None,
        tls: ServerTls | None = None,
        *,
        budget: Budget | None = None,
        handshake_executor: Executor | None = None,
        lanes: Lanes | None = None,
    ) -> None:
        """Without ``lanes`` the device is read and written on the event loop only (the
        stream endpoint's, whose deltas change under it there); only loading chunks and
        flushing go to the pool."""
        super().__init__(ServerConnection(tls_required=tls is not None), budget or Budget(), log)
        self.provider = provider
        self.on_close = on_close
        self.executor = executor
        self.handshake_executor = handshake_executor or executor
        self.tls = tls
        self.lanes = lanes
        self._lane: Lane | None = None  # this connection's, once it writes
        self.client = "-"  # who the TLS client certificate names
        self._upgrade: asyncio.Task[None] | None = None  # the STARTTLS upgrade under way
        self.device: BlockDevice | None = None
        self.export: ExportInfo | None = None
        self._ended = False  # NBD_CMD_DISC received and the flush after it done
        self.stats = {"requests": 0, "bytes_read": 0, "bytes_written": 0, "errors": 0}

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_close is not None:
            self.on_close(self)
            self.on_close = None
        if self.export is not None:
            log_event(
                self.log, "disconnect", client=self.peer, export=self.export.name, **self.stats
            )
        self._release()

    def _release(self) -> None:
        """Give the device back once the connection is gone and no job uses it."""
        if self.export is None or not self._closing or self._jobs:
            return
        name, device = self.export.name, self.device
        self.export = None
        self.device = None
        if device is not None:
            self.provider.release(name, device, ended=self._ended)

    def _disconnect(self, *, said_goodbye: bool = False) -> None:
        """The client is done: make its writes durable, then hang up. The flush runs in
        the lane, after the writes still queued, like every write: never on the loop.
        Only a client that said NBD_CMD_DISC ended its session cleanly; end of stream
        alone is a crash or a lost link, after which it may come back."""
        self._disconnecting = True
        device = self.device
        if device is None:
            self._hang_up("")
            return

        def done(exc: BaseException | None) -> None:
            self._ended = said_goodbye and exc is None
            self._hang_up(f"flush at disconnect failed: {exc}" if exc is not None else "")

        if self.lanes is not None:
            self._in_lane(device.flush, done, 0)
        else:
            self._offload_flush(device, done)

    # -- handshake ----------------------------------------------------------------------

    def _option(self, event: Event) -> None:
        if not isinstance(event, _CATALOG_OPTIONS):
            self._decided(event, Opened(negotiate(event, self.provider, self.conn)))
            return
        self._option_busy = True
        self._set_reading()
        self._jobs += 1
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.handshake_executor, self._open, event)
        future.add_done_callback(lambda f: self._option_done(event, f))

    def _open(self, event: Event) -> Opened:
        """On the handshake pool: the decision, and the device it starts on. Open before
        the reply that starts transmission: a device that cannot be opened (its delta
        locked by a commit or reset) is then an error the client can read after
        NBD_OPT_GO, not a hang-up."""
        decision = negotiate(event, self.provider, self.conn)
        if decision.export is None:
            return Opened(decision)
        try:
            return Opened(decision, self.provider.open(decision.export.name, self.peer))
        except _DEVICE_ERRORS as exc:
            return Opened(decision, error=exc)

    def _option_done(self, event: Event, future: asyncio.Future[Opened]) -> None:
        self._jobs -= 1
        self._option_busy = False
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            self._hang_up(f"cannot answer option: {exc or 'cancelled'}")
            self._release()
            return
        opened = future.result()
        if self._closing:
            if opened.device is not None and opened.decision.export is not None:
                self.provider.release(opened.decision.export.name, opened.device, ended=False)
            self._release()
            return
        self._decided(event, opened)
        self._set_reading()
        self._pump()

    def _decided(self, event: Event, opened: Opened) -> None:
        decision = opened.decision
        export = decision.export
        if export is not None and opened.device is None:
            reason = f"cannot open {export.name}: {opened.error}"
            if isinstance(event, OptInfo):
                log_event(
                    self.log,
                    "refused",
                    logging.WARNING,
                    client=self.peer,
                    export=export.name,
                    reason=str(opened.error),
                )
                self._send(OptionReply(Opt.GO, Rep.ERR_UNKNOWN, reason.encode()))
            else:  # NBD_OPT_EXPORT_NAME cannot fail politely: the spec says hang up
                self._hang_up(reason)
            return
        if export is not None and opened.device is not None:
            if opened.device.info.read_only != export.read_only:
                # the device decides: a second writer's view is read-only (and the lookup
                # before it may have been answered while another client wrote)
                assert isinstance(event, OptExportName | OptInfo)
                export = replace(export, read_only=opened.device.info.read_only)
                decision = opening(event, export)
            self.device, self.export = opened.device, export
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
        if export is not None:
            self._transmission(export)
        if decision.hang_up:
            self._hang_up(decision.reason)

    def _transmission(self, export: ExportInfo) -> None:
        log_event(
            self.log,
            "connect",
            client=self.peer,
            credential=self.client,
            export=export.name,
            structured=self.conn.structured,
            size=export.size,
        )
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._last_request = asyncio.get_running_loop().time()
        self._idle_timer = call_later(self.limits.idle_timeout, self._idle_check)

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
        self._raw, self._transport = self._transport, transport
        self._reading = True
        self._write_paused = False
        self._buffer_limits()
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            self.provider, self.client = await loop.run_in_executor(
                self.handshake_executor, self.tls.authorize, der
            )
        except _DEVICE_ERRORS as exc:
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
        self._last_request = asyncio.get_running_loop().time()
        error, message = check_request(req, self.export, self.conn)
        if error:
            self._error(req, error, message)
            return
        try:
            self._dispatch(req, self.device)
        except PermissionError as exc:
            self._error(req, Errno.EPERM, str(exc))
        except _DEVICE_ERRORS as exc:
            self._error(req, Errno.EIO, str(exc))

    def _dispatch(self, req: Request, device: BlockDevice) -> None:
        cmd = req.cmd
        if cmd == Cmd.READ:
            if not device.would_block(req.offset, req.length):
                self._send_read(req, device.read(req.offset, req.length))
            elif self.lanes is not None:
                self._offload(req, lambda: self._load(req, device), self._read_done(req))
            else:
                self._offload(
                    req,
                    lambda: device.prefetch(req.offset, req.length),
                    lambda _: self._send_read(req, device.read(req.offset, req.length)),
                )
        elif cmd in _WRITES and self.lanes is not None:
            self._in_lane(self._write_work(req, device), self._write_done(req), req.length)
        elif cmd in _WRITES:
            self._write_work(req, device)()
            self._written(req)
        elif cmd == Cmd.FLUSH:
            self._offload(req, device.flush, lambda _: self._send(SimpleReply(req.handle)))
        elif cmd == Cmd.CACHE:
            self._offload(
                req,
                lambda: device.prefetch(req.offset, req.length),
                lambda _: self._send(SimpleReply(req.handle)),
            )
        elif cmd == Cmd.BLOCK_STATUS:
            self._block_status(req, device)

    @staticmethod
    def _load(req: Request, device: BlockDevice) -> list[memoryview]:
        """On the pool: what the read needs, loaded, then read."""
        device.prefetch(req.offset, req.length)
        return device.read(req.offset, req.length)

    def _read_done(self, req: Request) -> Callable[[Any], None]:
        return lambda segments: self._send_read(req, segments)

    def _send_read(self, req: Request, segments: list[memoryview]) -> None:
        self.stats["bytes_read"] += req.length
        self._send(ReadData(req.handle, req.offset, segments))

    @staticmethod
    def _write_work(req: Request, device: BlockDevice) -> Callable[[], None]:
        fua = bool(req.flags & CmdFlag.FUA)
        if req.cmd == Cmd.WRITE:
            assert req.data is not None
            data = req.data
            return lambda: device.write(req.offset, data, fua)
        # TRIM is advisory; dropping the data to zeros is one valid way to honour it.
        return lambda: device.write_zeroes(req.offset, req.length, fua)

    def _written(self, req: Request) -> None:
        if req.cmd == Cmd.WRITE:
            self.stats["bytes_written"] += req.length
        self._send(SimpleReply(req.handle))

    def _block_status(self, req: Request, device: BlockDevice) -> None:
        # The spec lets a reply cover less than was asked (the client asks again): a 4 GiB
        # query walks a million delta blocks, on the loop.
        extents = device.extents(req.offset, min(req.length, BLOCK_STATUS_SPAN))
        if req.flags & CmdFlag.REQ_ONE:
            extents = extents[:1]
        self._send(BlockStatus(req.handle, BASE_ALLOCATION_ID, extents))

    def _offload(self, req: Request, work: Callable[[], Any], then: Callable[[Any], None]) -> None:
        """Run ``work`` on the pool (each request on its own), then ``then`` with its
        result on the loop."""
        held = req.length if req.cmd == Cmd.READ else 0
        self._held += held
        self._jobs += 1
        future = asyncio.get_running_loop().run_in_executor(self.executor, work)

        def done(f: asyncio.Future[Any]) -> None:
            self._jobs -= 1
            self._held -= held
            if self._closing:
                self._release()
                return
            exc = f.exception()
            if exc is not None:
                self._error(req, Errno.EIO, str(exc))
            else:
                try:
                    then(f.result())
                except _DEVICE_ERRORS as err:
                    self._error(req, Errno.EIO, str(err))
            self._after_job()

        future.add_done_callback(done)

    def _write_done(self, req: Request) -> Callable[[BaseException | None], None]:
        def done(exc: BaseException | None) -> None:
            if exc is None:
                self._written(req)
            else:
                errno = Errno.EPERM if isinstance(exc, PermissionError) else Errno.EIO
                self._error(req, errno, str(exc))

        return done

    def _in_lane(
        self, work: Callable[[], None], then: Callable[[BaseException | None], None], held: int
    ) -> None:
        """Run ``work`` in this connection's lane (after its writes before it), then
        ``then`` with the exception it raised, if any, on the loop."""
        assert self.lanes is not None
        if self._lane is None:
            self._lane = self.lanes.pick()
        self._held += held
        self._jobs += 1

        def done(exc: BaseException | None, _result: object) -> None:
            self._jobs -= 1
            self._held -= held
            if self._closing:
                self._release()
                return
            then(exc)
            self._after_job()

        self._lane.submit(work, done)

    def _offload_flush(
        self, device: BlockDevice, then: Callable[[BaseException | None], None]
    ) -> None:
        """The flush at disconnect, without lanes: on the pool (an fdatasync on the loop
        would stall every connection), or here when the pool is gone (shutdown)."""
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, device.flush)
        except RuntimeError:
            device.flush()
            then(None)
            return
        future.add_done_callback(
            lambda f: then(asyncio.CancelledError() if f.cancelled() else f.exception())
        )

    def _after_job(self) -> None:
        """A pool or lane job ended: send what it produced and go on if it was waited for."""
        self._flush_out()
        self.settle()
        if self._waiting and self._can_go():
            self._go_on()

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
