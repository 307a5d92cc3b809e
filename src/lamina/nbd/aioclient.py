"""A minimal asyncio NBD client over the sans-I/O client state machine: for lamina's own
tools and tests (qemu and libnbd are the real clients)."""

from __future__ import annotations

import asyncio
import struct

from lamina.errors import ProtocolError
from lamina.nbd.client import ChunkReceived, ClientConnection, Greeting, SimpleReplyReceived
from lamina.nbd.constants import PARTIAL_REPLIES, Cmd, Info, Opt, Rep, ReplyType
from lamina.nbd.events import NEED_DATA, Closed, Event, OptionReply


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
