"""The batch request parser reads the stream exactly as ServerConnection does."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lamina.errors import ProtocolError
from lamina.nbd import Cmd, CmdFlag, ServerConnection
from lamina.nbd.batch import RequestReader, as_event, ok_reply, read_head
from lamina.nbd.constants import MAX_PAYLOAD, REQUEST, REQUEST_MAGIC
from lamina.nbd.events import NEED_DATA, Closed, Disconnect, ReadData, Request, SimpleReply
from lamina.nbd.server import Phase


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    head = REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length)
    return head + (bytes([handle % 251]) * length if cmd == Cmd.WRITE else b"")


def transmitting() -> ServerConnection:
    conn = ServerConnection()
    conn.phase = Phase.TRANSMISSION
    return conn


def by_events(stream: bytes, cuts: list[int]) -> list[Request | str]:
    """What ServerConnection makes of the stream, delivered in pieces."""
    conn, out = transmitting(), []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    for piece in filter(None, pieces):  # b"" would mean the end of the stream
        conn.receive_data(piece)
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, Disconnect | Closed):
                return [*out, "disc"]
            assert isinstance(event, Request)
            out.append(event)
    return out


def by_batches(stream: bytes, cuts: list[int]) -> list[Request | str]:
    """What RequestReader makes of it, the caller owning and compacting the buffer."""
    reader, buf, start, out = RequestReader(), bytearray(), 0, []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    for piece in pieces:
        del buf[:start]  # compacting: no view of the buffer may be left from the last parse
        buf += piece
        start = _parse_into(reader, buf, out)
        if reader.disconnected:
            return [*out, "disc"]
    return out


def _parse_into(reader: RequestReader, buf: bytearray, out: list[Request | str]) -> int:
    requests, start, need = reader.parse(buf, 0, len(buf))
    assert need >= 0
    for req in requests:
        event = as_event(req)
        data = None if event.data is None else bytes(event.data)  # copied: the buffer moves on
        out.append(
            Request(
                event.cmd,
                event.flags,
                event.handle,
                event.offset,
                event.length,
                data,
                event.oversize,
            )
        )
    return start


def normalized(items: list[Request | str]) -> list[object]:
    return [
        i
        if isinstance(i, str)
        else (
            i.cmd,
            i.flags,
            i.handle,
            i.offset,
            i.length,
            None if i.data is None else bytes(i.data),
            i.oversize,
        )
        for i in items
    ]


requests = st.lists(
    st.tuples(
        st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, 9]),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**40),
        st.integers(0, 3000),
        st.sampled_from([0, int(CmdFlag.FUA), 0x80]),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(requests, st.booleans(), st.lists(st.integers(0, 40000), max_size=8))
def test_same_requests_as_the_state_machine(
    items: list[tuple[int, int, int, int, int]], disc: bool, cuts: list[int]
) -> None:
    stream = b"".join(request(c, h, o, n, f) for c, h, o, n, f in items)
    if disc:
        stream += request(Cmd.DISC, 0, 0, 0) + request(Cmd.READ, 1, 0, 512)  # ignored after
    cuts = sorted({min(c, len(stream)) for c in cuts})
    assert normalized(by_batches(stream, cuts)) == normalized(by_events(stream, cuts))


def test_oversize_write_is_drained_then_reported_after_its_bytes() -> None:
    head = REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 7, 0, MAX_PAYLOAD + 1)
    stream = head + bytes(MAX_PAYLOAD + 1) + request(Cmd.READ, 8, 0, 4096)
    cuts = [10, len(head) + 100, 5000, len(stream) - 30]
    got = normalized(by_batches(stream, cuts))
    assert got == normalized(by_events(stream, cuts))
    assert [g[2] for g in got] == [7, 8] and got[0][6] is True  # type: ignore[index]


def test_a_write_waits_for_its_whole_payload_and_says_how_much_it_needs() -> None:
    reader = RequestReader()
    buf = bytearray(request(Cmd.WRITE, 1, 4096, 10000)[:5000])
    requests, start, need = reader.parse(buf, 0, len(buf))
    assert (requests, start, need) == ([], 0, 28 + 10000)


def test_bad_magic_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        RequestReader().parse(bytearray(b"\x00" * 28), 0, 28)


@pytest.mark.parametrize("structured", [True, False])
def test_replies_are_the_bytes_the_state_machine_sends(structured: bool) -> None:
    conn = transmitting()
    conn.structured = structured
    data = b"x" * 4096
    expected = b"".join(conn.send_parts(ReadData(42, 8192, [data])))
    assert read_head(structured, 42, 8192, len(data)) + data == expected
    assert ok_reply(43) == conn.send(SimpleReply(43))


def test_simple_reply_layout() -> None:
    magic, error, handle = struct.unpack(">IIQ", ok_reply(5))
    assert (magic, error, handle) == (0x67446698, 0, 5)
