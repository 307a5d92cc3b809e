"""NBD_OPT_STARTTLS in the state machine and the negotiation rules, without sockets: a
server that requires TLS (the spec's FORCEDTLS mode, as qemu-nbd and nbdkit run with
--tls=require) and one that offers none (NOTLS)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.errors import ProtocolError
from lamina.nbd import ExportInfo, Opt, Rep, ServerConnection, negotiate
from lamina.nbd.client import ClientConnection, Greeting
from lamina.nbd.events import (
    NEED_DATA,
    ClientFlags,
    Closed,
    OptExportName,
    OptionReply,
    OptStartTls,
    Request,
)
from lamina.nbd.negotiate import Refusal
from lamina.nbd.server import Phase
from tests.nbd.test_protocol import Catalog, events


class TlsPair:
    """A client and a server state machine wired together in memory; ``handshake()``
    stands in for the TLS handshake the adapter runs on the socket."""

    def __init__(self, *, tls: bool = True, catalog: object | None = None) -> None:
        self.server = ServerConnection(tls_required=tls)
        self.client = ClientConnection()
        self.catalog = catalog or Catalog()
        self.client.receive_data(self.server.initiate())
        assert isinstance(self.client.next_event(), Greeting)
        self.server.receive_data(self.client.client_flags())
        assert isinstance(self.server.next_event(), ClientFlags)

    def option(self, data: bytes) -> list[OptionReply]:
        self.server.receive_data(data)
        evs = events(self.server)
        assert len(evs) == 1, evs
        decision = negotiate(evs[0], self.catalog, self.server)  # type: ignore[arg-type,arg-type]
        for reply in decision.replies:
            self.client.receive_data(self.server.send(reply))
        return [e for e in events(self.client) if isinstance(e, OptionReply)]

    def starttls(self) -> None:
        assert self.option(self.client.option(Opt.STARTTLS))[-1].reply == Rep.ACK
        assert self.server.phase is Phase.STARTTLS
        self.server.tls_established()


_HEAD = 16  # IHAVEOPT, option, length
_C = ClientConnection()


@pytest.mark.parametrize(
    ("option", "payload"),
    [
        (Opt.LIST, b""),
        (Opt.INFO, _C.go("img")[_HEAD:]),
        (Opt.GO, _C.go("img")[_HEAD:]),
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.SET_META_CONTEXT, _C.set_meta_context("img", ("base:allocation",))[_HEAD:]),
        (Opt.LIST, b"junk"),  # malformed: still TLS first
        (99, b"xyz"),  # unknown: still TLS first
    ],
)
def test_every_option_but_starttls_and_abort_needs_tls_first(option: int, payload: bytes) -> None:
    pair = TlsPair()
    replies = pair.option(pair.client.option(option, payload))
    assert [(r.option, r.reply) for r in replies] == [(option, Rep.ERR_TLS_REQD)]
    assert pair.server.phase is Phase.OPTIONS and not pair.server.structured


def test_export_name_without_tls_hangs_up() -> None:
    pair = TlsPair()
    pair.server.receive_data(pair.client.option(Opt.EXPORT_NAME, b"img"))
    (event,) = events(pair.server)
    assert event == OptExportName("img")
    decision = negotiate(event, pair.catalog, pair.server)  # type: ignore[arg-type]
    assert decision.hang_up and decision.replies == [] and decision.export is None


def test_abort_is_answered_before_tls() -> None:
    pair = TlsPair()
    assert pair.option(pair.client.option(Opt.ABORT))[-1].reply == Rep.ACK
    assert pair.server.phase is Phase.CLOSED


def test_starttls_then_negotiation_as_usual() -> None:
    pair = TlsPair()
    pair.starttls()
    assert pair.server.tls_active and pair.server.phase is Phase.OPTIONS
    assert pair.option(pair.client.option(Opt.STRUCTURED_REPLY))[-1].reply == Rep.ACK
    replies = pair.option(pair.client.go("img"))
    assert replies[-1].reply == Rep.ACK and pair.server.phase is Phase.TRANSMISSION


def test_starttls_forgets_what_was_negotiated_before() -> None:
    pair = TlsPair(tls=False)  # a plain server: structured replies may come first
    pair.server.tls_offered = True  # offered, not required (the spec's SELECTIVETLS)
    assert pair.option(pair.client.option(Opt.STRUCTURED_REPLY))[-1].reply == Rep.ACK
    assert pair.server.structured
    pair.starttls()
    assert not pair.server.structured and pair.server.meta_contexts == {}


def test_starttls_twice_is_invalid() -> None:
    pair = TlsPair()
    pair.starttls()
    assert pair.option(pair.client.option(Opt.STARTTLS))[-1].reply == Rep.ERR_INVALID


def test_starttls_with_data_is_invalid() -> None:
    pair = TlsPair()
    assert pair.option(pair.client.option(Opt.STARTTLS, b"x"))[-1].reply == Rep.ERR_INVALID
    assert pair.server.phase is Phase.OPTIONS and not pair.server.tls_active


def test_a_server_without_tls_refuses_starttls_by_policy() -> None:
    pair = TlsPair(tls=False)
    replies = pair.option(pair.client.option(Opt.STARTTLS))
    assert replies[-1].reply == Rep.ERR_POLICY
    assert pair.option(pair.client.go("img"))[-1].reply == Rep.ACK  # and never TLS_REQD


def test_bytes_pipelined_behind_starttls_are_fatal() -> None:
    """The client must wait for the ACK before its TLS hello: anything sent in between
    would be read as plain text by one side and as TLS by the other."""
    pair = TlsPair()
    pair.server.receive_data(pair.client.option(Opt.STARTTLS) + b"\x16\x03\x01")
    (event,) = events_until_error(pair.server)
    assert isinstance(event, OptStartTls)
    pair.server.send(negotiate(event, pair.catalog, pair.server).replies[0])  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="before the TLS handshake"):
        pair.server.next_event()


def events_until_error(conn: ServerConnection) -> list[object]:
    return [conn.next_event()]


def test_tls_established_only_after_the_ack() -> None:
    pair = TlsPair()
    with pytest.raises(ProtocolError):
        pair.server.tls_established()


class Guarded(Catalog):
    """A catalog that refuses machine/m1 to this client, as a machine credential sees
    another machine's disk."""

    def lookup(self, name: str) -> ExportInfo | Refusal | None:  # type: ignore[override]
        if name == "machine/m1":
            return Refusal("machine/m1 is not open to this credential")
        return super().lookup(name)


def test_a_refused_export_answers_policy_with_the_reason() -> None:
    pair = TlsPair(catalog=Guarded())
    pair.starttls()
    replies = pair.option(pair.client.go("machine/m1"))
    assert replies[-1].reply == Rep.ERR_POLICY and b"not open" in replies[-1].data
    assert pair.server.phase is Phase.OPTIONS
    pair.option(pair.client.option(Opt.STRUCTURED_REPLY))
    replies = pair.option(pair.client.set_meta_context("machine/m1", ("base:allocation",)))
    assert replies[-1].reply == Rep.ERR_POLICY
    assert pair.option(pair.client.go("img"))[-1].reply == Rep.ACK


def test_a_refused_export_name_hangs_up() -> None:
    pair = TlsPair(catalog=Guarded())
    pair.starttls()
    pair.server.receive_data(pair.client.option(Opt.EXPORT_NAME, b"machine/m1"))
    (event,) = events(pair.server)
    assert negotiate(event, pair.catalog, pair.server).hang_up  # type: ignore[arg-type]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_to_a_tls_server_raise_only_protocol_errors(
    blob: bytes, starttls: bool
) -> None:
    """Whatever a client sends before or after STARTTLS, the server answers (never with
    anything but TLS_REQD, ACK to STARTTLS or ABORT before TLS) or raises ProtocolError."""
    server = ServerConnection(tls_required=True)
    server.initiate()
    client = ClientConnection()
    # with starttls the blob comes after the handshake (TLS bytes are not the machine's)
    lead = client.client_flags() + client.option(Opt.STARTTLS) if starttls else b""
    server.receive_data(lead or client.client_flags() + blob)
    catalog = Catalog()
    try:
        while True:
            ev = server.next_event()
            if isinstance(ev, Closed):
                return
            if ev is NEED_DATA:
                if server.phase is not Phase.STARTTLS:
                    return
                server.tls_established()  # the adapter's handshake, with nothing pending
                server.receive_data(blob)
                continue
            if isinstance(ev, Request | ClientFlags):
                continue
            before_tls = not server.tls_active
            for reply in negotiate(ev, catalog, server).replies:  # type: ignore[arg-type]
                if before_tls and isinstance(reply, OptionReply):
                    assert reply.reply == Rep.ERR_TLS_REQD or reply.option in (
                        Opt.STARTTLS,
                        Opt.ABORT,
                    )
                server.send(reply)
    except ProtocolError:
        pass
