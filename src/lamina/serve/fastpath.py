"""The transmission phase of a plain NBD connection, on its raw socket.

After the handshake (``NbdServerProtocol``), a connection without TLS moves here: requests
are cut out of each received batch by ``nbd.batch``, a read whose bytes are in the page
cache is answered on the event loop with ``preadv(RWF_NOWAIT)`` into a scratch buffer the
process shares, and the replies of a batch leave in one ``sendmsg``. A write of whole
blocks into a machine's delta is applied on the loop too while it can only copy into the
page cache (``pagecache``: the kernel is far from throttling writers, no write waits for
the writer thread, the last one applied here did not wait). Everything that could wait for
the disk goes to threads:

    a read the page cache cannot answer,      the thread pool (hydrate chunks, pread)
    or whose chunks are not ready yet
    other writes, zeroes, trims               the process's ``Writer`` thread, in order (a
                                              delta has one writer); replies once done
    flushes, FUA, closing a device            the pool, after the writes before them

Why (profiled with py-spy and measured in CPU seconds per GiB of a 32-machine storm):
the event-object path cost 12 us a request and the process 1.05 s per GiB; this loop
costs about 2 us a request, and the kernel's copies and loopback TCP are most of what is
left. ``sendfile`` from the packs measured no better than ``preadv`` + one ``sendmsg``
for 4-128 KiB replies, and cannot batch replies.

What a client may cost is bounded as on the handshake's path (``nbd.limits``): a read
that would take the connection's unsent replies (reads in flight, replies the socket has
not taken) past ``reply_bytes``, or the process's past its share of
``total_reply_bytes``, waits with the requests after it, and the socket is not read
meanwhile; a client that takes none of its replies for ``stall_timeout`` is dropped, one
that asks nothing for ``idle_timeout`` (when set) too.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import socket
from collections.abc import Callable
from typing import Final

from lamina.errors import LaminaError, ProtocolError
from lamina.logs import event as log_event
from lamina.nbd import ExportInfo, ServerConnection, check_request
from lamina.nbd.aio import BLOCK_STATUS_SPAN
from lamina.nbd.batch import HEAD, RequestReader, Tuple, as_event, ok_reply, read_head
from lamina.nbd.constants import Cmd, CmdFlag, Errno
from lamina.nbd.device import BlockDevice
from lamina.nbd.events import BlockStatus, Buffer, ErrorReply, Event
from lamina.nbd.negotiate import BASE_ALLOCATION_ID
from lamina.serve.fastbounds import owned
from lamina.serve.fastsend import Replies
from lamina.serve.imagefiles import Segment
from lamina.serve.shared import ARENA, Shared

# Receive buffer: requests of a batch; grows for a large write's payload, and shrinks back
# once drained, so an idle machine costs 32 KiB here (a fixed 256 KiB was 32 MiB for 128).
_RBUF: Final = 32 << 10
# Zeros sent for holes: a private anonymous read-only mapping, whose pages are all the
# kernel's one zero page (a bytes object of zeros was 1 MiB of each process's RSS).
_ZEROS = memoryview(mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ))
_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 0)
_READ: Final = int(Cmd.READ)
_WRITE: Final = int(Cmd.WRITE)
_FLUSH: Final = int(Cmd.FLUSH)
_FUA: Final = int(CmdFlag.FUA)  # a plain int: ``int & CmdFlag`` costs 2 us in enum code
_READ_FLAGS: Final = _FUA  # DF (structured only) goes the checked way
_WRITE_FLAGS: Final = _FUA

What = tuple[int, int, int, int]  # a request as its error log names it: cmd, handle, offset, length


class FastConnection(Replies):
    """One client in transmission, after its handshake."""

    def __init__(
        self,
        shared: Shared,
        sock: socket.socket,
        conn: ServerConnection,
        device: BlockDevice,
        export: ExportInfo,
        peer: str,
        release: Callable[[bool], None],
        gone: Callable[[], None] = lambda: None,
    ) -> None:
        """``gone``: called once the connection is closed (its address leaves the count)."""
        self.shared = shared
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.structured = conn.structured
        self.device = device
        self.export = export
        self.peer = peer
        self._release = release  # called with True after NBD_CMD_DISC, False after EOF
        self._gone = gone
        self._goodbye = False
        self._locate = getattr(device, "locate", None)
        self._whole = getattr(device, "write_whole", None)  # a machine's delta
        self._writer = shared.writer
        self.reader = RequestReader()
        self.rbuf = bytearray(_RBUF)
        self.start = self.end = 0
        self.need = HEAD
        self.outbox: list[Buffer] = []
        self.pending: list[Buffer] = []  # replies the socket did not take yet
        self.inflight = 0
        self.closing = False
        self.reading = False
        self.held = 0  # ``hold`` calls not yet undone: no requests are taken meanwhile
        self.ended = False  # NBD_CMD_DISC, and the flush after it succeeded
        self.stats = {"requests": 0, "bytes_read": 0, "bytes_written": 0, "errors": 0}
        self._bound(shared)
        shared.connections.add(self)
        self._idle_check()
        sock.setblocking(False)
        self._resume_reading()

    # -- socket ----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes that arrived with the handshake: requests sent right after GO."""
        if len(data) > len(self.rbuf):
            self.rbuf.extend(bytes(len(data) - len(self.rbuf)))
        self.rbuf[: len(data)] = data
        self.end = len(data)
        self._process()

    def _resume_reading(self) -> None:
        if self.reading or self.closing or self.held or self.reader.disconnected:
            return
        if not self.pending and not self.stash:
            self.reading = True
            self.shared.loop.add_reader(self.fd, self._readable)

    def hold(self) -> None:
        """Take no more requests (they wait in the socket) until ``unhold``: a backup
        copies the disk meanwhile, after the writes taken so far."""
        self.held += 1
        self._pause_reading()

    def unhold(self) -> None:
        self.held -= 1
        if not self.pending:
            self._resume_reading()
            if self.end > self.start and self.reading:  # a request that came in whole
                self._process()

    def _pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.shared.loop.remove_reader(self.fd)

    def _room(self) -> None:
        """Space after ``end`` for the next receive, at least what the next request needs
        (a large write's payload): compacted first, back to the small size once empty."""
        want = max(self.need, _RBUF)
        if self.start == self.end:
            self.start = self.end = 0
            if len(self.rbuf) > _RBUF:
                del self.rbuf[_RBUF:]
        elif self.start + want > len(self.rbuf):
            kept = self.end - self.start
            self.rbuf[:kept] = self.rbuf[self.start : self.end]
            self.start, self.end = 0, kept
        if want > len(self.rbuf):
            self.rbuf.extend(bytes(want - len(self.rbuf)))

    def _readable(self) -> None:
        self._room()
        try:
            with memoryview(self.rbuf) as view:
                n = self.sock.recv_into(view[self.end :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not n:
            self.close()
            return
        self.end += n
        self._process()

    # -- requests --------------------------------------------------------------------

    def _process(self) -> None:
        try:
            requests, self.start, self.need = self.reader.parse(self.rbuf, self.start, self.end)
        except ProtocolError as exc:
            self._hang_up(str(exc))
            return
        if self.start == self.end:
            self.start = self.end = 0
        if self.limits.idle_timeout:
            self._last = self.shared.loop.time()
        self._run(requests)

    def _run(self, requests: list[Tuple]) -> None:
        used = 0
        for i, req in enumerate(requests):
            if self._held_back(req):
                # the rest waits, out of the receive buffer (which may be reused)
                self.stash = [owned(r) for r in requests[i:]]
                break
            used = self._request(req, used)
        self.flush()
        if self.stash:
            self._pause_reading()
            self.budget.wait(self)
        elif self.reader.disconnected:
            self._disconnect()

    def _request(self, req: Tuple, used: int) -> int:
        """Answer one request; returns how much of the scratch buffer is in use."""
        cmd, flags, handle, offset, length, data = req
        self.stats["requests"] += 1
        export = self.export
        if cmd == _READ and not flags & ~_READ_FLAGS and offset + length <= export.size:
            if length <= export.max_block:
                return self._read(handle, offset, length, used)
        elif cmd == _WRITE and data is not None and not export.read_only:
            if not flags & ~_WRITE_FLAGS and offset + length <= export.size:
                self._write(handle, offset, data, bool(flags & _FUA))
                return used
        elif cmd == _FLUSH and not flags and not offset and not length:
            self._serial((cmd, handle, 0, 0), self.device.flush, pooled=True)
            return used
        self._checked(req)
        return used

    def _read(self, handle: int, offset: int, length: int, used: int) -> int:
        self.stats["bytes_read"] += length
        segments: list[Segment] = []
        if self._locate is not None and self._locate(offset, length, segments):
            if length > ARENA:
                got = self._read_into(memoryview(bytearray(length)), segments)
            else:
                if used + length > ARENA:
                    self.flush()  # the scratch buffer is reused once its replies are sent
                    used = 0
                got = self._read_into(self.shared.arena[used : used + length], segments)
                if got is not None:
                    used += length
            if got is not None:
                self.outbox.append(read_head(self.structured, handle, offset, length))
                self.outbox += got
                self._batch_bytes += length
                return used
        elif self._locate is None and not self.device.would_block(offset, length):
            self._reply_read(handle, offset, self.device.read(offset, length))
            return used
        self._offload_read(handle, offset, length)
        return used

    def _read_into(self, buf: memoryview, segments: list[Segment]) -> list[Buffer] | None:
        """The segments' bytes if the page cache holds them all (None: a thread must)."""
        parts: list[Buffer] = []
        pos = 0
        for fd, position, n in segments:
            if fd is None:
                parts += _zeros(n)
                continue
            view = buf[pos : pos + n]
            try:
                if os.preadv(fd, [view], position, _NOWAIT) != n:
                    return None  # partly cached, or past the end of a delta's data
            except BlockingIOError:
                return None
            parts.append(view)
            pos += n
        return parts

    def _offload_read(self, handle: int, offset: int, length: int) -> None:
        self.inflight += 1
        self._reading_bytes += length
        future = self.shared.loop.run_in_executor(
            self.shared.pool, self.device.read, offset, length
        )

        def done(f: asyncio.Future[list[memoryview]]) -> None:
            self.inflight -= 1
            self._reading_bytes -= length
            if not self.closing:
                error = f.exception()
                if error is None:
                    self._reply_read(handle, offset, f.result())
                else:
                    self._error((_READ, handle, offset, length), error)
                self.flush()
            self._maybe_release()

        future.add_done_callback(done)

    def _reply_read(self, handle: int, offset: int, data: list[memoryview]) -> None:
        size = sum(len(d) for d in data)
        self.outbox.append(read_head(self.structured, handle, offset, size))
        self.outbox += data
        self._batch_bytes += size

    def _write(self, handle: int, offset: int, data: Buffer, fua: bool) -> None:
        """``data``: a view of the receive buffer, copied only if the write waits."""
        self.stats["bytes_written"] += len(data)
        device = self.device
        what = (_WRITE, handle, offset, len(data))
        if not fua and self._whole is not None and self.shared.may_write_now():
            started = self.shared.writing_now()
            try:
                done = self._whole(offset, data)
            except Exception as exc:
                self._error(what, exc)
                return
            if done:
                self.shared.wrote_now(started)
                self.outbox.append(ok_reply(handle))
                return
        payload = bytes(data)
        self._writing += len(payload)
        self._serial(what, lambda: device.write(offset, payload, False), fua=fua, size=len(payload))

    def _serial(
        self,
        what: What,
        job: Callable[[], object],
        *,
        pooled: bool = False,
        fua: bool = False,
        size: int = 0,
    ) -> None:
        """Run ``job`` on the writer thread (``pooled``: on the pool after the writes
        before it); answer OK, or its error, when it is done (``fua``: once it is also
        flushed, the fdatasync on the pool rather than on the writer)."""
        self.inflight += 1

        def done(error: BaseException | None) -> None:
            self.inflight -= 1
            self._writing -= size  # the payload is applied (or failed): no longer held
            if fua and error is None and not self.closing:
                self._serial(what, self.device.flush, pooled=True)
                return
            if not self.closing:
                if error is None:
                    self.outbox.append(ok_reply(what[1]))
                else:
                    self._error(what, error)
                self.shared.mark(self)
            self._maybe_release()

        (self._writer.after if pooled else self._writer.write)(job, done)

    def _checked(self, req: Tuple) -> None:
        """The uncommon requests, through the event API's rules (check_request)."""
        event = as_event(req)
        what = (event.cmd, event.handle, event.offset, event.length)
        error, message = check_request(event, self.export, self.conn)
        if error:
            self._error(what, None, error, message)
            return
        cmd, device = event.cmd, self.device
        if cmd == Cmd.READ:  # DF, or a read the quick test did not take
            self._offload_read(event.handle, event.offset, event.length)
        elif cmd == Cmd.WRITE:
            assert event.data is not None
            self._write(event.handle, event.offset, event.data, bool(event.flags & CmdFlag.FUA))
        elif cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
            fua = bool(event.flags & CmdFlag.FUA)
            self._serial(
                what, lambda: device.write_zeroes(event.offset, event.length, False), fua=fua
            )
        elif cmd == Cmd.FLUSH:
            self._serial(what, device.flush, pooled=True)
        elif cmd == Cmd.CACHE:
            self.inflight += 1
            future = self.shared.loop.run_in_executor(
                self.shared.pool, device.prefetch, event.offset, event.length
            )
            future.add_done_callback(lambda f: self._cached(what, f))
        elif cmd == Cmd.BLOCK_STATUS:
            extents = device.extents(event.offset, min(event.length, BLOCK_STATUS_SPAN))
            if event.flags & CmdFlag.REQ_ONE:
                extents = extents[:1]
            self._send_event(BlockStatus(event.handle, BASE_ALLOCATION_ID, extents))

    def _cached(self, what: What, future: asyncio.Future[None]) -> None:
        self.inflight -= 1
        if not self.closing:
            error = future.exception()
            if error is None:
                self.outbox.append(ok_reply(what[1]))
            else:
                self._error(what, error)
            self.flush()
        self._maybe_release()

    def _error(
        self, what: What, exc: BaseException | None, error: Errno = Errno.EIO, message: str = ""
    ) -> None:
        """Answer a request with an error, logged as ``NbdServerProtocol`` logs them (an
        unexpected exception as an error with its type)."""
        if exc is not None:
            error = Errno.EPERM if isinstance(exc, PermissionError) else Errno.EIO
            message = str(exc) if isinstance(exc, OSError | LaminaError) else repr(exc)
        cmd, handle, offset, length = what
        self.stats["errors"] += 1
        log_event(
            self.shared.log,
            "request-error",
            logging.INFO
            if exc is None or isinstance(exc, OSError | LaminaError)
            else logging.ERROR,
            client=self.peer,
            export=self.export.name,
            command=cmd,
            offset=offset,
            length=length,
            error=error.name,
            message=message,
        )
        self._send_event(ErrorReply(handle, error, message))

    def _send_event(self, event: Event) -> None:
        self.outbox += self.conn.send_parts(event)

    # -- the end ---------------------------------------------------------------------

    def _disconnect(self) -> None:
        """NBD_CMD_DISC: make the writes durable, then hang up (after the requests in flight)."""
        self._goodbye = True
        self._pause_reading()
        self.inflight += 1

        def done(error: BaseException | None) -> None:
            self.inflight -= 1
            self.ended = error is None  # a clean end of the session: see ExportCatalog
            if error is not None:
                log_event(
                    self.shared.log,
                    "hang-up",
                    logging.WARNING,
                    client=self.peer,
                    reason=f"flush at disconnect failed: {error}",
                )
            self.flush()
            self.close()

        self._writer.after(self.device.flush, done)

    def _hang_up(self, reason: str) -> None:
        log_event(self.shared.log, "hang-up", logging.WARNING, client=self.peer, reason=reason)
        self.flush()
        self.close()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self._pause_reading()
        self.shared.loop.remove_writer(self.fd)
        self.pending.clear()
        self._unbound()
        self.sock.close()
        self.shared.retire(self)
        self._gone()
        if self.shared.on_close is not None:
            self.shared.on_close()
        log_event(
            self.shared.log, "disconnect", client=self.peer, export=self.export.name, **self.stats
        )
        self._maybe_release()

    def _maybe_release(self) -> None:
        """Give the device back once nothing of this connection uses it any more, on the
        device's queue: after its writes, and its last user closes it there (a flush)."""
        if not self.closing or self.inflight or self._release is _released:
            return
        release, self._release = self._release, _released
        ended = self.ended
        self._writer.after(lambda: release(ended), lambda error: None)


def _zeros(n: int) -> list[Buffer]:
    return [_ZEROS[: min(len(_ZEROS), n - i)] for i in range(0, n, len(_ZEROS))]


def _released(_ended: bool) -> None:
    pass
