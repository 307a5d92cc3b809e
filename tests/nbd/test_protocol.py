"""The NBD state machines and negotiation rules, without sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.errors import ProtocolError
from lamina.nbd import (
    ClientConnection,
    Cmd,
    CmdFlag,
    Errno,
    ExportInfo,
    Opt,
    Rep,
    ServerConnection,
    check_request,
    negotiate,
)
from lamina.nbd.client import ChunkReceived, Greeting, SimpleReplyReceived
from lamina.nbd.constants import MAX_PAYLOAD, ReplyType
from lamina.nbd.events import (
    NEED_DATA,
    ClientFlags,
    Closed,
    Disconnect,
    ErrorReply,
    Event,
    ExportNameReply,
    OptExportName,
    OptInfo,
    OptInvalid,
    OptionReply,
    OptUnsupported,
    ReadData,
    Request,
    SimpleReply,
)
from lamina.nbd.server import Phase


class Catalog:
    def __init__(self) -> None:
        self.exports = {
            "img": ExportInfo("img", 1 << 20, read_only=True),
            "machine/m1": ExportInfo("machine/m1", 1 << 20, read_only=False),
        }

    def lookup(self, name: str) -> ExportInfo | None:
        return self.exports.get(name)

    def names(self) -> list[str]:
        return list(self.exports)


def events(conn: ServerConnection | ClientConnection) -> list[object]:
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or isinstance(ev, Closed):
            return out
        out.append(ev)


class Pair:
    """A client and a server machine wired together in memory."""

    def __init__(self) -> None:
        self.server = ServerConnection()
        self.client = ClientConnection()
        self.catalog = Catalog()
        self.client.receive_data(self.server.initiate())
        assert isinstance(self.client.next_event(), Greeting)
        self.to_server(self.client.client_flags())

    def to_server(self, data: bytes) -> list[object]:
        self.server.receive_data(data)
        return events(self.server)

    def option(self, data: bytes) -> list[OptionReply]:
        evs = self.to_server(data)
        assert len(evs) == 1
        decision = negotiate(evs[0], self.catalog, self.server)  # type: ignore[arg-type]
        for reply in decision.replies:
            self.client.receive_data(self.server.send(reply))
        return [e for e in events(self.client) if isinstance(e, OptionReply)]

    def go(self, name: str = "machine/m1", structured: bool = True) -> list[OptionReply]:
        if structured:
            assert self.option(self.client.option(Opt.STRUCTURED_REPLY))[-1].reply == Rep.ACK
        return self.option(self.client.go(name))


def test_greeting_and_client_flags() -> None:
    server = ServerConnection()
    greeting = server.initiate()
    assert greeting[:16] == b"NBDMAGICIHAVEOPT" and struct.unpack(">H", greeting[16:])[0] == 3
    server.receive_data(struct.pack(">I", 3))
    assert server.next_event() == ClientFlags(fixed_newstyle=True, no_zeroes=True)
    assert server.phase is Phase.OPTIONS


def test_unknown_client_flags_are_fatal() -> None:
    server = ServerConnection()
    server.receive_data(struct.pack(">I", 0x80))
    with pytest.raises(ProtocolError):
        server.next_event()


def test_go_enters_transmission_with_export_info_and_block_sizes() -> None:
    pair = Pair()
    replies = pair.go()
    assert replies[-1].reply == Rep.ACK
    infos = {struct.unpack(">H", r.data[:2])[0]: r.data[2:] for r in replies if r.reply == Rep.INFO}
    size, flags = struct.unpack(">QH", infos[0])
    assert size == 1 << 20 and flags & 1 and not flags & 2  # HAS_FLAGS, writable
    assert struct.unpack(">III", infos[3]) == (1, 4096, MAX_PAYLOAD)
    assert pair.server.phase is Phase.TRANSMISSION and pair.server.structured


def test_unknown_export_is_refused_and_negotiation_goes_on() -> None:
    pair = Pair()
    assert pair.option(pair.client.go("nope"))[-1].reply == Rep.ERR_UNKNOWN
    assert pair.server.phase is Phase.OPTIONS
    assert pair.go("img")[-1].reply == Rep.ACK


def test_list_names_every_export() -> None:
    pair = Pair()
    replies = pair.option(pair.client.option(Opt.LIST))
    names = [r.data[4:].decode() for r in replies if r.reply == Rep.SERVER]
    assert names == ["img", "machine/m1"] and replies[-1].reply == Rep.ACK


@pytest.mark.parametrize(
    ("option", "data", "expected"),
    [
        (Opt.LIST, b"junk", Rep.ERR_INVALID),
        (Opt.GO, b"\0\0\0\x09img", Rep.ERR_INVALID),  # name length beyond the data
        (Opt.STARTTLS, b"", Rep.ERR_POLICY),  # no TLS on this server
        (Opt.EXTENDED_HEADERS, b"", Rep.ERR_UNSUP),
        (99, b"xyz", Rep.ERR_UNSUP),
        (Opt.SET_META_CONTEXT, b"\0" * 8, Rep.ERR_INVALID),  # before structured replies
    ],
)
def test_bad_options_get_error_replies(option: int, data: bytes, expected: Rep) -> None:
    pair = Pair()
    assert pair.option(pair.client.option(option, data))[-1].reply == expected
    assert pair.go()[-1].reply == Rep.ACK  # and the session goes on


def test_meta_context_selection() -> None:
    pair = Pair()
    pair.option(pair.client.option(Opt.STRUCTURED_REPLY))
    replies = pair.option(pair.client.set_meta_context("img", ("base:allocation", "x-other:thing")))
    contexts = [r for r in replies if r.reply == Rep.META_CONTEXT]
    assert len(contexts) == 1 and contexts[0].data[4:] == b"base:allocation"
    assert pair.server.meta_contexts == {1: "base:allocation"}


def test_export_name_reply_honours_no_zeroes() -> None:
    for no_zeroes, length in ((True, 10), (False, 134)):
        server = ServerConnection()
        server.initiate()
        server.receive_data(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
        server.receive_data(ClientConnection().option(Opt.EXPORT_NAME, b"img"))
        evs = events(server)
        assert evs[1] == OptExportName("img")
        assert len(server.send(ExportNameReply(1 << 20, 1))) == length
        assert server.phase is Phase.TRANSMISSION


def test_export_name_for_unknown_export_hangs_up() -> None:
    pair = Pair()
    evs = pair.to_server(pair.client.option(Opt.EXPORT_NAME, b"missing"))
    assert negotiate(evs[0], pair.catalog, pair.server).hang_up  # type: ignore[arg-type]


def test_no_event_while_an_option_waits_for_its_reply() -> None:
    pair = Pair()
    evs = pair.to_server(pair.client.go("img") + pair.client.option(Opt.LIST))
    assert len(evs) == 1 and isinstance(evs[0], OptInfo)  # the LIST waits for GO's reply


def test_requests_writes_and_disconnect() -> None:
    pair = Pair()
    pair.go()
    c = pair.client
    evs = pair.to_server(
        c.request(Cmd.READ, 1, 0, 512)
        + c.request(Cmd.WRITE, 2, 4096, data=b"x" * 100)
        + c.request(Cmd.FLUSH, 3)
        + c.request(Cmd.DISC, 4)
    )
    assert evs[0] == Request(Cmd.READ, 0, 1, 0, 512)
    assert evs[1] == Request(Cmd.WRITE, 0, 2, 4096, 100, b"x" * 100)
    assert isinstance(evs[2], Request) and isinstance(evs[3], Disconnect)
    assert pair.server.phase is Phase.CLOSED


def test_write_payload_split_across_receives() -> None:
    pair = Pair()
    pair.go()
    raw = pair.client.request(Cmd.WRITE, 7, 0, data=bytes(range(256)) * 16)
    assert pair.to_server(raw[:100]) == []
    assert pair.to_server(raw[100:]) == [Request(Cmd.WRITE, 0, 7, 0, 4096, bytes(range(256)) * 16)]


def test_oversize_write_is_drained_then_reported() -> None:
    pair = Pair()
    pair.go()
    n = MAX_PAYLOAD + 1
    head = struct.pack(">IHHQQI", 0x25609513, 0, Cmd.WRITE, 9, 0, n)
    assert pair.to_server(head + bytes(1 << 20)) == []
    evs = pair.to_server(bytes(n - (1 << 20)) + pair.client.request(Cmd.FLUSH, 10))
    assert isinstance(evs[0], Request) and evs[0].oversize and evs[0].data is None
    error, _ = check_request(evs[0], pair.catalog.exports["machine/m1"], pair.server)
    assert error == Errno.EOVERFLOW
    assert isinstance(evs[1], Request) and evs[1].handle == 10  # framing kept


def test_bad_request_magic_is_fatal() -> None:
    pair = Pair()
    pair.go()
    pair.server.receive_data(b"\xde\xad\xbe\xef" + bytes(24))
    with pytest.raises(ProtocolError):
        pair.server.next_event()


def test_read_replies_structured_and_simple() -> None:
    pair = Pair()
    pair.go()
    pair.client.receive_data(pair.server.send(ReadData(5, 0, [b"ab", memoryview(b"cd")])))
    chunk = pair.client.next_event()
    assert isinstance(chunk, ChunkReceived) and chunk.kind == ReplyType.OFFSET_DATA
    assert chunk.payload == bytes(8) + b"abcd" and chunk.flags & 1
    pair.client.receive_data(pair.server.send(ErrorReply(6, Errno.EINVAL, "nope")))
    err = pair.client.next_event()
    assert isinstance(err, ChunkReceived) and err.kind == ReplyType.ERROR
    assert struct.unpack(">IH", err.payload[:6]) == (Errno.EINVAL, 4)

    simple = Pair()
    simple.go(structured=False)
    simple.client.request(Cmd.READ, 5, 0, 4)
    simple.client.receive_data(simple.server.send(ReadData(5, 0, [b"abcd"])))
    assert simple.client.next_event() == SimpleReplyReceived(5, 0, b"abcd")
    simple.client.receive_data(simple.server.send(SimpleReply(6, Errno.EPERM)))
    assert simple.client.next_event() == SimpleReplyReceived(6, Errno.EPERM, b"")


RO = ExportInfo("img", 1 << 20, read_only=True)
RW = ExportInfo("machine/m1", 1 << 20, read_only=False)


@pytest.mark.parametrize(
    ("req", "info", "expected"),
    [
        (Request(Cmd.READ, 0, 1, 0, 4096), RO, Errno.OK),
        (Request(Cmd.READ, 0, 1, (1 << 20) - 1, 2), RO, Errno.EINVAL),
        (Request(Cmd.WRITE, 0, 1, 0, 1, b"x"), RO, Errno.EPERM),
        (Request(Cmd.WRITE, 0, 1, 1 << 20, 1, b"x"), RW, Errno.ENOSPC),
        (Request(Cmd.TRIM, 0, 1, 0, 4096), RO, Errno.EPERM),
        (Request(Cmd.READ, int(CmdFlag.NO_HOLE), 1, 0, 1), RO, Errno.EINVAL),
        (Request(Cmd.FLUSH, 0, 1, 5, 0), RW, Errno.EINVAL),
        (Request(42, 0, 1, 0, 0), RO, Errno.EINVAL),
        (Request(Cmd.BLOCK_STATUS, 0, 1, 0, 4096), RO, Errno.EINVAL),  # no context
        (Request(Cmd.READ, 0, 1, 0, MAX_PAYLOAD + 1), RO, Errno.EOVERFLOW),
        (Request(Cmd.WRITE_ZEROES, int(CmdFlag.FUA | CmdFlag.NO_HOLE), 1, 0, 8192), RW, Errno.OK),
    ],
)
def test_request_checks(req: Request, info: ExportInfo, expected: Errno) -> None:
    pair = Pair()
    pair.go()
    assert check_request(req, info, pair.server)[0] == expected


def _drive(server: ServerConnection, data: bytes) -> None:
    """Feed bytes and answer every option the way the real server does."""
    catalog = Catalog()
    server.receive_data(data)
    while True:
        ev = server.next_event()
        if ev is NEED_DATA or isinstance(ev, Closed):
            return
        assert isinstance(ev, Event)
        if isinstance(ev, OptInvalid | OptUnsupported) or type(ev).__name__.startswith("Opt"):
            for reply in negotiate(ev, catalog, server).replies:
                server.send(reply)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.integers(0, 3))
def test_arbitrary_bytes_raise_only_protocol_errors(blob: bytes, prefix: int) -> None:
    """Whatever a client sends, in any phase, the parser answers or raises ProtocolError."""
    server = ServerConnection()
    server.initiate()
    client = ClientConnection()
    lead = [
        b"",
        client.client_flags(),
        client.client_flags() + client.option(Opt.STRUCTURED_REPLY),
        client.client_flags() + client.go("machine/m1"),
    ][prefix]
    try:
        _drive(server, lead + blob)
        _drive(server, b"")
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_client_parser_raises_only_protocol_errors(blob: bytes) -> None:
    client = ClientConnection()
    try:
        client.receive_data(ServerConnection().initiate() + blob)
        events(client)
    except ProtocolError:
        pass
