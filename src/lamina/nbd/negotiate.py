"""What a server answers during the handshake and which requests it refuses: pure
functions over an export catalogue, shared by every transport.

TLS follows the spec's modes: a connection with ``tls_required`` (FORCEDTLS) answers
every option but STARTTLS and ABORT with NBD_REP_ERR_TLS_REQD until TLS is up, and hangs
up on NBD_OPT_EXPORT_NAME (which cannot be refused politely); one with no TLS offered
(NOTLS) refuses STARTTLS by policy. Who may open what is the catalogue's business: it
answers ``lookup`` with a ``Refusal`` for an export this client may not open."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from lamina.nbd.constants import (
    BASE_ALLOCATION,
    MAX_PAYLOAD,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from lamina.nbd.events import (
    Event,
    ExportNameReply,
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
    Request,
)
from lamina.nbd.server import ServerConnection

BASE_ALLOCATION_ID = 1
_KNOWN_FLAGS = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag(0),
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag(0),
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}
_WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)


@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    size: int
    read_only: bool
    description: str = ""
    # Block size constraints: any alignment works, 4 KiB is what the delta tracks.
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD

    @property
    def flags(self) -> int:
        flags = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_DF
            | TransmissionFlag.SEND_CACHE
        )
        if self.read_only:
            # Every connection to an export shares one device object (one cache) in the
            # server, so a client may read through several. A writable export (a machine's
            # disk) has one writer, so it is not offered: qemu-nbd's default too.
            return int(flags | TransmissionFlag.READ_ONLY | TransmissionFlag.CAN_MULTI_CONN)
        return int(
            flags
            | TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
            | TransmissionFlag.SEND_FAST_ZERO
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """An export this client may not open (answered NBD_REP_ERR_POLICY with the reason,
    whether or not the export exists)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """No such export, and why (a malformed name, a version out of range): answered
    NBD_REP_ERR_UNKNOWN with the reason."""

    reason: str


class Catalog(Protocol):
    def lookup(self, name: str) -> ExportInfo | Refusal | Unknown | None: ...

    def names(self) -> list[str]:
        """The exports this client may open (NBD_OPT_LIST)."""
        ...


@dataclass(frozen=True, slots=True)
class Decision:
    replies: list[Event]
    export: ExportInfo | None = None  # set when transmission starts on this export
    hang_up: bool = False
    reason: str = ""  # why, for the log, when hanging up without a reply


def _unknown(found: Unknown | None, name: str) -> bytes:
    return (found.reason if found is not None else f"no export named {name!r}").encode()


def _u32str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">I", len(raw)) + raw


def _info_replies(option: int, info: ExportInfo, requests: tuple[int, ...]) -> list[Event]:
    out: list[Event] = [
        OptionReply(option, Rep.INFO, struct.pack(">HQH", Info.EXPORT, info.size, info.flags))
    ]
    if Info.NAME in requests:
        out.append(OptionReply(option, Rep.INFO, struct.pack(">H", Info.NAME) + info.name.encode()))
    if Info.DESCRIPTION in requests and info.description:
        desc = struct.pack(">H", Info.DESCRIPTION) + info.description.encode()
        out.append(OptionReply(option, Rep.INFO, desc))
    sizes = struct.pack(
        ">HIII", Info.BLOCK_SIZE, info.min_block, info.preferred_block, info.max_block
    )
    out.append(OptionReply(option, Rep.INFO, sizes))
    return out


def _meta_replies(event: OptMetaContext, catalog: Catalog) -> list[Event]:
    option = Opt.LIST_META_CONTEXT if event.list_only else Opt.SET_META_CONTEXT
    found = catalog.lookup(event.export)
    if isinstance(found, Refusal):
        return [OptionReply(option, Rep.ERR_POLICY, found.reason.encode())]
    if not isinstance(found, ExportInfo):
        return [OptionReply(option, Rep.ERR_UNKNOWN, _unknown(found, event.export))]
    wanted = event.queries or ((BASE_ALLOCATION,) if event.list_only else ())
    selected = any(q == BASE_ALLOCATION or (event.list_only and q == "base:") for q in wanted)
    out: list[Event] = []
    if selected:
        context_id = 0 if event.list_only else BASE_ALLOCATION_ID
        data = struct.pack(">I", context_id) + BASE_ALLOCATION.encode()
        out.append(OptionReply(option, Rep.META_CONTEXT, data))
    return [*out, OptionReply(option, Rep.ACK)]


# The option each handshake event answers (for replies that do not depend on its data).
_OPTION_OF: dict[type[Event], int] = {
    OptExportName: Opt.EXPORT_NAME,
    OptAbort: Opt.ABORT,
    OptList: Opt.LIST,
    OptStructuredReply: Opt.STRUCTURED_REPLY,
    OptStartTls: Opt.STARTTLS,
}
# What a connection that requires TLS answers before it is up (FORCEDTLS).
_BEFORE_TLS = frozenset({Opt.STARTTLS, Opt.ABORT})
_TLS_REQUIRED = b"this server requires TLS: send NBD_OPT_STARTTLS first"


def option_of(event: Event) -> int | None:
    """The option a handshake event came from (None for events that are not options)."""
    if isinstance(event, OptInfo):
        return Opt.GO if event.go else Opt.INFO
    if isinstance(event, OptMetaContext):
        return Opt.LIST_META_CONTEXT if event.list_only else Opt.SET_META_CONTEXT
    if isinstance(event, OptInvalid | OptUnsupported):
        return event.option
    return _OPTION_OF.get(type(event))


def _tls_gate(event: Event, conn: ServerConnection) -> Decision | None:
    """The answer of a connection that requires TLS before it is up, or None to go on."""
    if not conn.tls_required or conn.tls_active:
        return None
    option = option_of(event)
    if option is None or option in _BEFORE_TLS:
        return None
    if option == Opt.EXPORT_NAME:  # cannot be refused politely: the spec says hang up
        return Decision([], hang_up=True, reason="NBD_OPT_EXPORT_NAME before TLS")
    return Decision([OptionReply(option, Rep.ERR_TLS_REQD, _TLS_REQUIRED)])


def _starttls(conn: ServerConnection) -> Decision:
    if not conn.tls_offered:
        return Decision([OptionReply(Opt.STARTTLS, Rep.ERR_POLICY, b"TLS is off on this server")])
    if conn.tls_active:
        return Decision([OptionReply(Opt.STARTTLS, Rep.ERR_INVALID, b"TLS is already on")])
    return Decision([OptionReply(Opt.STARTTLS, Rep.ACK)])


def opening(event: OptExportName | OptInfo, info: ExportInfo) -> Decision:
    """The answer that describes ``info`` to NBD_OPT_INFO, or opens it for NBD_OPT_GO and
    NBD_OPT_EXPORT_NAME. Also what the adapter answers instead when the device it opened
    narrows this client's access (a read-only view of a disk another client writes)."""
    if isinstance(event, OptExportName):
        return Decision([ExportNameReply(info.size, info.flags)], export=info)
    option = Opt.GO if event.go else Opt.INFO
    replies = [*_info_replies(option, info, event.requests), OptionReply(option, Rep.ACK)]
    return Decision(replies, export=info if event.go else None)


def negotiate(event: Event, catalog: Catalog, conn: ServerConnection) -> Decision:
    """The replies to one handshake event."""
    gate = _tls_gate(event, conn)
    if gate is not None:
        return gate
    if isinstance(event, OptExportName):
        found = catalog.lookup(event.name)
        if not isinstance(found, ExportInfo):  # cannot be refused politely: hang up
            reason = found.reason if found is not None else f"no export {event.name!r}"
            return Decision([], hang_up=True, reason=reason)
        return opening(event, found)
    if isinstance(event, OptInfo):
        option = Opt.GO if event.go else Opt.INFO
        found = catalog.lookup(event.name)
        if isinstance(found, Refusal):
            return Decision([OptionReply(option, Rep.ERR_POLICY, found.reason.encode())])
        if not isinstance(found, ExportInfo):
            return Decision([OptionReply(option, Rep.ERR_UNKNOWN, _unknown(found, event.name))])
        return opening(event, found)
    if isinstance(event, OptList):
        servers: list[Event] = [
            OptionReply(Opt.LIST, Rep.SERVER, _u32str(n)) for n in catalog.names()
        ]
        return Decision([*servers, OptionReply(Opt.LIST, Rep.ACK)])
    if isinstance(event, OptStructuredReply):
        if conn.structured:
            return Decision([OptionReply(Opt.STRUCTURED_REPLY, Rep.ERR_INVALID, b"already on")])
        return Decision([OptionReply(Opt.STRUCTURED_REPLY, Rep.ACK)])
    if isinstance(event, OptMetaContext):
        return Decision(_meta_replies(event, catalog))
    if isinstance(event, OptStartTls):
        return _starttls(conn)
    if isinstance(event, OptAbort):
        return Decision([OptionReply(Opt.ABORT, Rep.ACK)], hang_up=True)
    if isinstance(event, OptInvalid):
        return Decision([OptionReply(event.option, Rep.ERR_INVALID, event.reason.encode())])
    if isinstance(event, OptUnsupported):
        return Decision([OptionReply(event.option, Rep.ERR_UNSUP)])
    return Decision([])


def check_request(req: Request, info: ExportInfo, conn: ServerConnection) -> tuple[Errno, str]:
    """``(Errno.OK, "")`` when the request may run, else the error to answer with."""
    known = _KNOWN_FLAGS.get(req.cmd)  # type: ignore[call-overload]
    if known is None:
        return Errno.EINVAL, f"unknown command {req.cmd}"
    if req.flags & ~int(known):
        return Errno.EINVAL, f"flags {req.flags:#x} are not valid for this command"
    if req.flags & CmdFlag.DF and not conn.structured:
        return Errno.EINVAL, "DF needs structured replies"
    if req.cmd in _WRITES and info.read_only:
        return Errno.EPERM, f"export {info.name!r} is read-only"
    if req.oversize or (req.cmd == Cmd.READ and req.length > info.max_block):
        return Errno.EOVERFLOW if conn.structured else Errno.EINVAL, "request is too large"
    if req.cmd == Cmd.FLUSH:
        return (Errno.OK, "") if req.offset == 0 and req.length == 0 else (Errno.EINVAL, "")
    if req.offset + req.length > info.size:
        err = Errno.ENOSPC if req.cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
        return err, f"range {req.offset}+{req.length} is beyond the end ({info.size})"
    if req.cmd == Cmd.BLOCK_STATUS:
        if BASE_ALLOCATION_ID not in conn.meta_contexts:
            return Errno.EINVAL, "no metadata context was negotiated"
        if req.length == 0:
            return Errno.EINVAL, "empty block status request"
    return Errno.OK, ""
