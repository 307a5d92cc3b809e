"""Transmission-phase requests parsed in batches, as plain tuples (sans-I/O).

``ServerConnection`` turns each request into an event object and each reply into bytes
through ``send_parts``: about 12 us a request on these VMs, more than the rest of a cached
64 KiB read costs. A block server answering tens of thousands of requests a second parses
a whole received buffer in one pass here instead, and encodes its two common replies
(read data, a bare OK) with one ``struct`` each. Every other reply (errors, block status)
still goes through ``ServerConnection.send_parts``, and the rules on which requests are
valid stay in ``negotiate.check_request``: ``as_event`` turns a tuple back into the
``Request`` those functions take. The framing is the same as ``ServerConnection``'s (a
test feeds both the same bytes): a bad magic is a ``ProtocolError``; a WRITE above
``MAX_PAYLOAD`` is read, dropped and reported ``oversize``.

A request tuple is ``(cmd, flags, handle, offset, length, data)``; ``data`` is a view into
the caller's buffer (a WRITE's payload) or None, valid until the caller reuses the buffer.
"""

from __future__ import annotations

import struct
from typing import Final

from lamina.errors import ProtocolError
from lamina.nbd.constants import (
    CHUNK,
    MAX_PAYLOAD,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    ReplyType,
)
from lamina.nbd.events import Request

Tuple = tuple[int, int, int, int, int, memoryview | None]

HEAD: Final = REQUEST.size  # 28
_unpack = REQUEST.unpack_from
_WRITE: Final = int(Cmd.WRITE)
_DISC: Final = int(Cmd.DISC)
# A structured OFFSET_DATA chunk's header followed by the data's offset: 28 bytes.
_pack_data = struct.Struct(CHUNK.format + "Q").pack
_pack_simple = SIMPLE_REPLY.pack
_DONE: Final = REPLY_FLAG_DONE
_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)


class RequestReader:
    """Cuts complete requests out of a receive buffer; remembers only an oversize WRITE's
    payload still to drop, so the caller owns (and may compact) the buffer."""

    __slots__ = ("_oversize", "_skip", "disconnected")

    def __init__(self) -> None:
        self._skip = 0
        self._oversize: Tuple | None = None
        self.disconnected = False

    def parse(self, buf: bytearray, start: int, end: int) -> tuple[list[Tuple], int, int]:
        """``(requests, where parsing stopped, bytes the next request needs)`` for
        ``buf[start:end]``. Stops after NBD_CMD_DISC (``disconnected``: ignore the rest)."""
        out: list[Tuple] = []
        pos = self._drop(out, start, end)
        view: memoryview | None = None
        while not self._skip and end - pos >= HEAD:
            magic, flags, cmd, handle, offset, length = _unpack(buf, pos)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if cmd == _WRITE:
                if length > MAX_PAYLOAD:
                    self._skip = length
                    self._oversize = (cmd, flags, handle, offset, length, None)
                    pos = self._drop(out, pos + HEAD, end)
                    continue
                if end - pos < HEAD + length:
                    return out, pos, HEAD + length
                if view is None:
                    view = memoryview(buf)
                out.append(
                    (cmd, flags, handle, offset, length, view[pos + HEAD : pos + HEAD + length])
                )
                pos += HEAD + length
                continue
            pos += HEAD
            if cmd == _DISC:
                self.disconnected = True
                return out, end, 0
            out.append((cmd, flags, handle, offset, length, None))
        return out, pos, 0 if self._skip else HEAD

    def _drop(self, out: list[Tuple], pos: int, end: int) -> int:
        """Consume what is left of an oversize WRITE's payload; once it is all gone, the
        request itself is reported (so it is answered after its bytes, in order)."""
        if not self._skip:
            return pos
        dropped = min(self._skip, end - pos)
        self._skip -= dropped
        if not self._skip:
            assert self._oversize is not None
            out.append(self._oversize)
            self._oversize = None
        return pos + dropped


def is_oversize(req: Tuple) -> bool:
    """A WRITE whose payload was dropped for being above MAX_PAYLOAD."""
    return req[0] == _WRITE and req[5] is None


def as_event(req: Tuple) -> Request:
    """The ``Request`` event of a tuple, for ``check_request`` and the event API."""
    cmd, flags, handle, offset, length, data = req
    return Request(cmd, flags, handle, offset, length, data, oversize=is_oversize(req))


def read_head(structured: bool, handle: int, offset: int, length: int) -> bytes:
    """What precedes ``length`` bytes of read data: a structured OFFSET_DATA chunk (the
    last one of its reply) or a simple reply, as ``ServerConnection`` writes them."""
    if structured:
        return _pack_data(STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, handle, length + 8, offset)
    return _pack_simple(SIMPLE_REPLY_MAGIC, 0, handle)


def ok_reply(handle: int) -> bytes:
    """A simple reply without error (WRITE, FLUSH, TRIM, ... in either reply mode)."""
    return _pack_simple(SIMPLE_REPLY_MAGIC, 0, handle)
