"""The server side of NBD as a sans-I/O state machine, in the style of h11.

Feed it the client's bytes with ``receive_data`` (``b""`` for end of stream), pull events
with ``next_event`` until it returns ``NEED_DATA`` or a ``Closed``, and turn replies into
bytes with ``send`` / ``send_parts``. It never touches a socket, so every rule of the
protocol is testable with plain bytes. Broken framing (bad magic, unknown client flags,
absurd option lengths) raises ``ProtocolError``: the session cannot go on and the adapter
hangs up. Everything else is answered on the wire.

Phases and who moves them:

    FLAGS --client flags--> OPTIONS --send(ExportNameReply) or send(GO ACK)--> TRANSMISSION
    OPTIONS --send(ABORT ACK)--> CLOSED        TRANSMISSION --NBD_CMD_DISC / EOF--> CLOSED
    OPTIONS --send(STARTTLS ACK)--> STARTTLS --tls_established()--> OPTIONS (over TLS)

While an option waits for its final reply no further event is produced: bytes after a GO
belong to whichever phase the reply selects. In STARTTLS the adapter runs the TLS
handshake on its socket and then calls ``tls_established``; the client may send nothing
between the option and the ACK, so bytes buffered in that phase end the session.
``tls_required`` is the spec's FORCEDTLS mode (every option but STARTTLS and ABORT is
refused until TLS is up); the rules live in ``negotiate``, the state here.
"""

from __future__ import annotations

import struct
from enum import Enum

from lamina.errors import ProtocolError
from lamina.nbd.constants import (
    CHUNK,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_HEAD,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    PARTIAL_REPLIES,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    HandshakeFlag,
    Opt,
    Rep,
    ReplyType,
)
from lamina.nbd.events import (
    NEED_DATA,
    BlockStatus,
    Buffer,
    ClientFlags,
    Closed,
    Disconnect,
    Done,
    ErrorReply,
    Event,
    ExportNameReply,
    NeedData,
    OptAbort,
    OptExportName,
    OptInfo,
    OptInvalid,
    OptionReply,
    OptList,
    OptMetaContext,
    OptStartTls,
    OptStructuredReply,
    OptUnsupported,
    ReadData,
    ReadHole,
    Request,
    SimpleReply,
)

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
# Compact the receive buffer once this much of it has been consumed.
_COMPACT_AT = 1 << 16


class Phase(Enum):
    FLAGS = "flags"
    OPTIONS = "options"
    STARTTLS = "starttls"  # the ACK is sent: the adapter runs the TLS handshake
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class _Reader:
    """Bounds-checked parsing of an option's data; any overrun is an OptInvalid."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("option data is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def string(self, n: int) -> str:
        if n > MAX_STRING:
            raise ValueError(f"string of {n} bytes is longer than {MAX_STRING}")
        text = self.take(n).decode("utf-8")
        if "\0" in text:
            raise ValueError("string contains NUL")
        return text

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"{len(self.data) - self.pos} unexpected trailing bytes")


def _parse_option(option: int, data: bytes) -> Event:
    r = _Reader(data)
    try:
        if option == Opt.LIST:
            r.end()
            return OptList()
        if option == Opt.ABORT:
            return OptAbort()
        if option == Opt.STRUCTURED_REPLY:
            r.end()
            return OptStructuredReply()
        if option == Opt.STARTTLS:
            if data:
                raise ValueError("NBD_OPT_STARTTLS carries no data")
            return OptStartTls()
        if option in (Opt.INFO, Opt.GO):
            name = r.string(r.u32())
            requests = tuple(r.u16() for _ in range(r.u16()))
            r.end()
            return OptInfo(name, requests, go=option == Opt.GO)
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            export = r.string(r.u32())
            count = r.u32()
            if count > 1024:
                raise ValueError("too many meta context queries")
            queries = tuple(r.string(r.u32()) for _ in range(count))
            r.end()
            return OptMetaContext(export, queries, list_only=option == Opt.LIST_META_CONTEXT)
    except (ValueError, UnicodeDecodeError) as exc:
        return OptInvalid(option, str(exc))
    return OptUnsupported(option)


class ServerConnection:
    def __init__(
        self,
        *,
        allow_no_zeroes: bool = True,
        tls_required: bool = False,
        tls_offered: bool | None = None,
    ) -> None:
        self.phase = Phase.FLAGS
        self.tls_required = tls_required
        self.tls_offered = tls_required if tls_offered is None else tls_offered
        self.tls_active = False
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._handshake = HandshakeFlag.FIXED_NEWSTYLE | (
            HandshakeFlag.NO_ZEROES if allow_no_zeroes else 0
        )
        self.no_zeroes = False
        self.structured = False
        self.meta_contexts: dict[int, str] = {}
        self._awaiting: int | None = None  # option whose final reply is pending
        self._skip = 0  # bytes of an oversize WRITE still to drop
        self._oversize: Request | None = None

    # -- input ----------------------------------------------------------------------

    def initiate(self) -> bytes:
        """The server's greeting: NBDMAGIC, IHAVEOPT and the handshake flags."""
        return _U64.pack(NBDMAGIC) + _U64.pack(IHAVEOPT) + _U16.pack(self._handshake)

    def receive_data(self, data: Buffer) -> None:
        if not data:
            self._eof = True
            return
        if self._pos >= _COMPACT_AT or (self._pos and self._pos == len(self._buf)):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def unconsumed(self) -> bytes:
        """Bytes received but not yet made into an event (part of the next one), for an
        adapter that parses the rest of the stream itself."""
        return bytes(self._buf[self._pos :])

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:
            out = view[self._pos : self._pos + n].tobytes()
        self._pos += n
        return out

    def next_event(self) -> Event | NeedData | Closed:
        if self.phase is Phase.CLOSED:
            return Closed("session over")
        event = self._next()
        if event is NEED_DATA and self._eof:
            self.phase = Phase.CLOSED
            return Closed("end of stream")
        return event

    def _next(self) -> Event | NeedData:
        if self.phase is Phase.FLAGS:
            return self._client_flags()
        if self.phase is Phase.OPTIONS:
            return NEED_DATA if self._awaiting is not None else self._option()
        if self.phase is Phase.STARTTLS:
            if self._available():
                raise ProtocolError("client sent data before the TLS handshake")
            return NEED_DATA
        return self._request()

    def _client_flags(self) -> Event | NeedData:
        if self._available() < 4:
            return NEED_DATA
        flags = _U32.unpack(self._take(4))[0]
        known = ClientFlag.FIXED_NEWSTYLE | (
            ClientFlag.NO_ZEROES if self._handshake & HandshakeFlag.NO_ZEROES else 0
        )
        if flags & ~int(known):
            raise ProtocolError(f"client sent unknown handshake flags {flags:#x}")
        self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self.phase = Phase.OPTIONS
        return ClientFlags(bool(flags & ClientFlag.FIXED_NEWSTYLE), self.no_zeroes)

    def _option(self) -> Event | NeedData:
        if self._available() < OPTION_HEAD.size:
            return NEED_DATA
        magic, option, length = OPTION_HEAD.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise ProtocolError(f"option {option} carries {length} bytes of data")
        if self._available() < OPTION_HEAD.size + length:
            return NEED_DATA
        self._pos += OPTION_HEAD.size
        data = self._take(length)
        self._awaiting = option
        if option == Opt.EXPORT_NAME:
            try:
                return OptExportName(data.decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtocolError("export name is not UTF-8") from None
        event = _parse_option(option, data)
        if isinstance(event, OptMetaContext) and not self.structured:
            return OptInvalid(option, "structured replies must be negotiated first")
        if isinstance(event, OptMetaContext) and not event.list_only:
            self.meta_contexts = {}
        return event

    def _request(self) -> Event | NeedData:
        if self._skip:
            dropped = min(self._skip, self._available())
            self._pos += dropped
            self._skip -= dropped
            if self._skip:
                return NEED_DATA
            pending, self._oversize = self._oversize, None
            assert pending is not None
            return pending
        if self._available() < REQUEST.size:
            return NEED_DATA
        magic, flags, cmd, handle, offset, length = REQUEST.unpack_from(self._buf, self._pos)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        if cmd == Cmd.WRITE:
            if length > MAX_PAYLOAD:
                self._pos += REQUEST.size
                self._skip = length
                self._oversize = Request(cmd, flags, handle, offset, length, None, oversize=True)
                return self._request()
            if self._available() < REQUEST.size + length:
                return NEED_DATA
            self._pos += REQUEST.size
            return Request(cmd, flags, handle, offset, length, self._take(length))
        self._pos += REQUEST.size
        if cmd == Cmd.DISC:
            self.phase = Phase.CLOSED
            return Disconnect()
        return Request(cmd, flags, handle, offset, length)

    # -- output ---------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        return b"".join(self.send_parts(event))

    def send_parts(self, event: Event) -> list[Buffer]:
        """The bytes for ``event`` as a list of buffers (data is never copied)."""
        if isinstance(event, ReadData):
            return self._read_data(event)
        if isinstance(event, SimpleReply):
            self._require(Phase.TRANSMISSION, event)
            return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, event.error, event.handle), *event.data]
        if isinstance(event, ErrorReply):
            return [self._error(event)]
        if isinstance(event, ReadHole):
            payload = _U64.pack(event.offset) + _U32.pack(event.length)
            return [self._chunk(event.handle, ReplyType.OFFSET_HOLE, payload, event.done)]
        if isinstance(event, BlockStatus):
            body = [_U32.pack(event.context_id)]
            body += [struct.pack(">II", n, f) for n, f in event.extents]
            return [self._chunk(event.handle, ReplyType.BLOCK_STATUS, b"".join(body), event.done)]
        if isinstance(event, Done):
            return [self._chunk(event.handle, ReplyType.NONE, b"", True)]
        if isinstance(event, OptionReply):
            return [self._option_reply(event)]
        if isinstance(event, ExportNameReply):
            return [self._export_name_reply(event)]
        raise TypeError(f"cannot send {type(event).__name__}")

    def _require(self, phase: Phase, event: Event) -> None:
        if self.phase is not phase and not (
            phase is Phase.TRANSMISSION and self.phase is Phase.CLOSED
        ):
            raise ProtocolError(f"cannot send {type(event).__name__} in phase {self.phase.value}")

    def _read_data(self, event: ReadData) -> list[Buffer]:
        self._require(Phase.TRANSMISSION, event)
        if not self.structured:
            return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, event.handle), *event.data]
        size = sum(len(d) for d in event.data)
        head = CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE if event.done else 0,
            ReplyType.OFFSET_DATA,
            event.handle,
            size + 8,
        )
        return [head + _U64.pack(event.offset), *event.data]

    def _chunk(self, handle: int, kind: int, payload: bytes, done: bool) -> bytes:
        if not self.structured:
            raise ProtocolError("structured replies were not negotiated")
        flags = REPLY_FLAG_DONE if done else 0
        return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, handle, len(payload)) + payload

    def _error(self, event: ErrorReply) -> bytes:
        self._require(Phase.TRANSMISSION, event)
        if not self.structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, event.error, event.handle)
        message = event.message.encode()[:MAX_STRING]
        payload = _U32.pack(event.error) + _U16.pack(len(message)) + message
        kind = ReplyType.ERROR
        if event.offset is not None:
            payload += _U64.pack(event.offset)
            kind = ReplyType.ERROR_OFFSET
        return self._chunk(event.handle, kind, payload, True)

    def _option_reply(self, event: OptionReply) -> bytes:
        self._require(Phase.OPTIONS, event)
        if self._awaiting != event.option:
            raise ProtocolError(f"no option {event.option} is waiting for a reply")
        final = event.reply not in PARTIAL_REPLIES
        if event.reply == Rep.META_CONTEXT and event.option == Opt.SET_META_CONTEXT:
            context_id = _U32.unpack(event.data[:4])[0]
            self.meta_contexts[context_id] = event.data[4:].decode()
        if final:
            self._awaiting = None
            if event.reply == Rep.ACK:
                self._after_ack(event.option)
        return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, event.option, event.reply, len(event.data)) + (
            event.data
        )

    def _after_ack(self, option: int) -> None:
        if option == Opt.GO:
            self.phase = Phase.TRANSMISSION
        elif option == Opt.ABORT:
            self.phase = Phase.CLOSED
        elif option == Opt.STRUCTURED_REPLY:
            self.structured = True
        elif option == Opt.STARTTLS:
            self.phase = Phase.STARTTLS

    def tls_established(self) -> None:
        """The adapter finished the TLS handshake: negotiation starts over, encrypted. The
        spec: nothing negotiated before STARTTLS survives it."""
        if self.phase is not Phase.STARTTLS:
            raise ProtocolError(f"no TLS handshake was due in phase {self.phase.value}")
        self.phase = Phase.OPTIONS
        self.tls_active = True
        self.structured = False
        self.meta_contexts = {}

    def _export_name_reply(self, event: ExportNameReply) -> bytes:
        self._require(Phase.OPTIONS, event)
        if self._awaiting != Opt.EXPORT_NAME:
            raise ProtocolError("no NBD_OPT_EXPORT_NAME is waiting for a reply")
        self._awaiting = None
        self.phase = Phase.TRANSMISSION
        out = _U64.pack(event.size) + _U16.pack(event.flags)
        return out if self.no_zeroes else out + bytes(124)
