"""The FUSE protocol for one read-only file (sans I/O: bytes in, bytes out).

A lazily attached layer's EROFS image is a FUSE filesystem whose root is a regular file
(FUSE mounts a file on a file), so the whole protocol needed is: INIT, GETATTR, OPEN,
READ, RELEASE, FLUSH, STATFS and DESTROY; FORGET and INTERRUPT need no answer, anything
else is answered ENOSYS. Layouts follow ``include/uapi/linux/fuse.h`` (protocol 7.31,
which every kernel since 5.4 speaks; newer kernels accept an older minor):

    request   fuse_in_header  len u32, opcode u32, unique u64, nodeid u64, uid, gid, pid
                              u32, total_extlen u16, padding u16          (40 bytes)
    reply     fuse_out_header len u32, error i32 (-errno), unique u64     (16 bytes)

The kernel's reads reach ``Reply.read`` as (offset, size); the caller answers with the
bytes or an errno. ``FuseFile`` keeps no state beyond the negotiated size of a read.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Final

LOOKUP, FORGET, GETATTR = 1, 2, 3
OPEN, READ, STATFS, RELEASE, FLUSH, INIT = 14, 15, 17, 18, 25, 26
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
NO_REPLY: Final = frozenset({FORGET, INTERRUPT, BATCH_FORGET})

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
_INIT_IN = struct.Struct("<IIII")
# major, minor, max_readahead, flags, max_background u16, congestion u16, max_write,
# time_gran, max_pages u16, map_alignment u16, flags2, max_stack_depth, unused[6]
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
_ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
_OPEN_OUT = struct.Struct("<QII")  # fh, open_flags, padding
_READ_IN = struct.Struct("<QQII")  # fh, offset, size, read_flags
_STATFS = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs, 80 bytes

MAJOR, MINOR = 7, 31
ASYNC_READ = 1 << 0
MAX_PAGES = 1 << 22
KEEP_CACHE = 1 << 1  # FOPEN_KEEP_CACHE: the page cache outlives an open
# 256 pages: reads of up to 1 MiB reach us as one request (the default is 128 KiB).
PAGES = 256
MAX_READ: Final = PAGES * 4096
# The device must be read with room for the largest request (a write, which a read-only
# file never gets) plus its header; the kernel refuses smaller buffers.
BUFFER: Final = MAX_READ + 4096
ROOT = 1
VALID = 1 << 62  # attributes never change: the kernel may keep them "forever"


@dataclass(frozen=True, slots=True)
class Request:
    opcode: int
    unique: int
    body: memoryview


@dataclass(frozen=True, slots=True)
class ReadAsk:
    unique: int
    offset: int
    size: int


def parse(data: bytes | memoryview) -> Request:
    """One request read from /dev/fuse."""
    view = memoryview(data)
    if len(view) < IN_HEADER.size:
        raise ValueError("fuse: request shorter than its header")
    length, opcode, unique, _node, _uid, _gid, _pid, _ext, _pad = IN_HEADER.unpack_from(view)
    if length != len(view):
        raise ValueError(f"fuse: request says {length} bytes, read {len(view)}")
    return Request(opcode, unique, view[IN_HEADER.size :])


def reply(unique: int, payload: bytes = b"", error: int = 0) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique) + payload


def reply_parts(unique: int, payload_len: int) -> bytes:
    """The header of a reply whose payload follows in further buffers (writev)."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, 0, unique)


class FuseFile:
    """Answers everything but reads for a read-only file of ``size`` bytes."""

    def __init__(self, size: int, *, mode: int = 0o100444, mtime: int = 0) -> None:
        self.size = size
        self.mode = mode
        self.mtime = mtime
        self.max_readahead = 0
        self.destroyed = False

    def handle(self, request: Request) -> bytes | ReadAsk | None:
        """The reply to send, a read to answer, or None (no reply is due)."""
        op, unique = request.opcode, request.unique
        if op in NO_REPLY:
            return None
        if op == INIT:
            return reply(unique, self._init(request.body))
        if op == GETATTR:
            return reply(unique, _ATTR_OUT.pack(VALID, 0, 0) + self._attr())
        if op == OPEN:
            return reply(unique, _OPEN_OUT.pack(0, KEEP_CACHE, 0))
        if op == READ:
            _fh, offset, size, _flags = _READ_IN.unpack_from(request.body)
            size = max(0, min(size, self.size - offset))
            return ReadAsk(unique, offset, size)
        if op in (RELEASE, FLUSH):
            return reply(unique)
        if op == STATFS:
            blocks = -(-self.size // 4096)
            return reply(unique, _STATFS.pack(blocks, 0, 0, 1, 0, 4096, 255, 4096, 0))
        if op == DESTROY:
            self.destroyed = True
            return reply(unique)
        return reply(unique, error=errno.ENOSYS)

    def _init(self, body: memoryview) -> bytes:
        major, minor, readahead, flags = _INIT_IN.unpack_from(body)
        if major != MAJOR:
            raise ValueError(f"fuse: kernel speaks protocol {major}.{minor}, not 7")
        self.max_readahead = readahead
        ours = flags & (ASYNC_READ | MAX_PAGES)
        return _INIT_OUT.pack(
            MAJOR, min(minor, MINOR), readahead, ours, 16, 12, 4096, 1, PAGES, 0, 0, 0
        )

    def _attr(self) -> bytes:
        blocks = -(-self.size // 512)
        return _ATTR.pack(
            ROOT, self.size, blocks, self.mtime, self.mtime, self.mtime,
            0, 0, 0, self.mode, 1, 0, 0, 0, 4096, 0,
        )  # fmt: skip
