"""The FUSE protocol for one read-only file, without a kernel: requests in, replies out."""

from __future__ import annotations

import errno
import struct

import pytest

from lamina.stream import fuse


def request(opcode: int, body: bytes = b"", unique: int = 7) -> fuse.Request:
    head = fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), opcode, unique, 1, 0, 0, 0, 0, 0)
    return fuse.parse(head + body)


def answer(reply: bytes | fuse.ReadAsk | None) -> tuple[int, int, bytes]:
    assert isinstance(reply, bytes)
    length, error, unique = fuse.OUT_HEADER.unpack_from(reply)
    assert length == len(reply)
    return error, unique, reply[fuse.OUT_HEADER.size :]


def test_init_takes_the_kernel_s_minor_up_to_ours_and_asks_for_1_mib_reads() -> None:
    f = fuse.FuseFile(10)
    flags = fuse.ASYNC_READ | fuse.MAX_PAGES | (1 << 5)  # and one we do not want
    error, unique, body = answer(
        f.handle(request(fuse.INIT, struct.pack("<IIII", 7, 45, 1 << 17, flags)))
    )
    major, minor, readahead, ours = struct.unpack_from("<IIII", body)
    assert (error, unique, major, minor, readahead) == (0, 7, 7, 31, 1 << 17)
    assert ours == fuse.ASYNC_READ | fuse.MAX_PAGES
    assert struct.unpack_from("<H", body, 28)[0] == fuse.PAGES  # max_pages
    with pytest.raises(ValueError, match="protocol 8"):
        f.handle(request(fuse.INIT, struct.pack("<IIII", 8, 0, 0, 0)))


def test_getattr_is_a_read_only_file_of_its_size() -> None:
    error, _, body = answer(fuse.FuseFile(5000).handle(request(fuse.GETATTR, bytes(16))))
    ino, size, blocks = struct.unpack_from("<QQQ", body, 16)
    mode = struct.unpack_from("<I", body, 16 + 60)[0]
    assert (error, ino, size, blocks, mode) == (0, 1, 5000, 10, 0o100444)


def test_reads_are_clamped_to_the_file() -> None:
    f = fuse.FuseFile(5000)
    ask = f.handle(request(fuse.READ, struct.pack("<QQII", 0, 4096, 8192, 0) + bytes(16), 9))
    assert ask == fuse.ReadAsk(9, 4096, 904)
    past = f.handle(request(fuse.READ, struct.pack("<QQII", 0, 6000, 10, 0) + bytes(16)))
    assert isinstance(past, fuse.ReadAsk) and past.size == 0


def test_forget_wants_no_answer_and_the_unknown_enosys() -> None:
    f = fuse.FuseFile(1)
    assert f.handle(request(fuse.FORGET, bytes(8))) is None
    error, _, _ = answer(f.handle(request(fuse.LOOKUP, b"name\0")))
    assert error == -errno.ENOSYS
    assert answer(f.handle(request(fuse.DESTROY)))[0] == 0 and f.destroyed


def test_a_request_whose_length_lies_is_refused() -> None:
    head = fuse.IN_HEADER.pack(100, fuse.GETATTR, 1, 1, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="says 100 bytes"):
        fuse.parse(head)
    with pytest.raises(ValueError, match="shorter"):
        fuse.parse(b"\0" * 10)
