"""The client side of NBD as a sans-I/O state machine (fixed newstyle, NBD_OPT_GO,
structured replies). Used by lamina's own asyncio client and by tests that need to send
what no well-behaved client would."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from lamina.errors import ProtocolError
from lamina.nbd.constants import (
    CHUNK,
    GREETING,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    Info,
    Opt,
    Rep,
)
from lamina.nbd.events import NEED_DATA, Buffer, Closed, Event, NeedData, OptionReply


class ClientPhase(Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Greeting(Event):
    handshake_flags: int


@dataclass(frozen=True, slots=True)
class SimpleReplyReceived(Event):
    handle: int
    error: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ChunkReceived(Event):
    handle: int
    flags: int
    kind: int
    payload: bytes


class ClientConnection:
    def __init__(self) -> None:
        self.phase = ClientPhase.GREETING
        self._buf = bytearray()
        self._eof = False
        self._reads: dict[int, int] = {}  # handle -> length, for simple READ replies
        self.structured = False

    def receive_data(self, data: Buffer) -> None:
        if not data:
            self._eof = True
        self._buf += data

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def next_event(self) -> Event | NeedData | Closed:
        if self.phase is ClientPhase.CLOSED:
            return Closed()
        if self.phase is ClientPhase.GREETING:
            event = self._greeting()
        elif self.phase is ClientPhase.OPTIONS:
            event = self._option_reply()
        else:
            event = self._reply()
        if event is NEED_DATA and self._eof:
            self.phase = ClientPhase.CLOSED
            return Closed("end of stream")
        return event

    def _greeting(self) -> Event | NeedData:
        if len(self._buf) < GREETING.size:
            return NEED_DATA
        magic, opt, flags = GREETING.unpack(self._take(GREETING.size))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise ProtocolError("not a newstyle NBD server")
        self.phase = ClientPhase.OPTIONS
        return Greeting(flags)

    def _option_reply(self) -> Event | NeedData:
        if len(self._buf) < OPTION_REPLY.size:
            return NEED_DATA
        magic, option, reply, length = OPTION_REPLY.unpack_from(self._buf)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        if len(self._buf) < OPTION_REPLY.size + length:
            return NEED_DATA
        del self._buf[: OPTION_REPLY.size]
        data = self._take(length)
        if option == Opt.GO and reply == Rep.ACK:
            self.phase = ClientPhase.TRANSMISSION
        if option == Opt.STRUCTURED_REPLY and reply == Rep.ACK:
            self.structured = True
        try:
            kind = Rep(reply)
        except ValueError:
            kind = Rep.ERR_UNSUP
        return OptionReply(option, kind, data)

    def _reply(self) -> Event | NeedData:
        if len(self._buf) < 4:
            return NEED_DATA
        magic = struct.unpack_from(">I", self._buf)[0]
        if magic == SIMPLE_REPLY_MAGIC:
            if len(self._buf) < SIMPLE_REPLY.size:
                return NEED_DATA
            _, error, handle = SIMPLE_REPLY.unpack_from(self._buf)
            length = self._reads.get(handle, 0) if error == 0 else 0
            if len(self._buf) < SIMPLE_REPLY.size + length:
                return NEED_DATA
            del self._buf[: SIMPLE_REPLY.size]
            self._reads.pop(handle, None)
            return SimpleReplyReceived(handle, error, self._take(length))
        if magic == STRUCTURED_REPLY_MAGIC:
            if len(self._buf) < CHUNK.size:
                return NEED_DATA
            _, flags, kind, handle, length = CHUNK.unpack_from(self._buf)
            if len(self._buf) < CHUNK.size + length:
                return NEED_DATA
            del self._buf[: CHUNK.size]
            return ChunkReceived(handle, flags, kind, self._take(length))
        raise ProtocolError(f"bad reply magic {magic:#x}")

    # -- output -------------------------------------------------------------------------

    def client_flags(self, no_zeroes: bool = True) -> bytes:
        flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0)
        return struct.pack(">I", flags)

    def option(self, option: int, data: bytes = b"") -> bytes:
        return struct.pack(">QII", IHAVEOPT, option, len(data)) + data

    def go(self, name: str, requests: tuple[int, ...] = (Info.BLOCK_SIZE,)) -> bytes:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
        data += b"".join(struct.pack(">H", r) for r in requests)
        return self.option(Opt.GO, data)

    def set_meta_context(self, export: str, queries: tuple[str, ...]) -> bytes:
        raw = export.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        data += b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in queries)
        return self.option(Opt.SET_META_CONTEXT, data)

    def request(
        self,
        cmd: int,
        handle: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: Buffer | None = None,
    ) -> bytes:
        if cmd == Cmd.READ:
            self._reads[handle] = length
        if cmd == Cmd.WRITE and data is not None:
            length = len(data)
        head = REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length)
        return head + bytes(data) if data is not None else head
