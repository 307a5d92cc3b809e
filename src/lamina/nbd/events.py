"""Events of the NBD protocol: what the client says (parsed by the state machines) and
what the server says (given to ``ServerConnection.send``). Frozen, slotted dataclasses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lamina.nbd.constants import Errno, Rep

Buffer = bytes | bytearray | memoryview


class Event:
    """Base of every event."""

    __slots__ = ()


# -- client -> server, handshake ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientFlags(Event):
    fixed_newstyle: bool
    no_zeroes: bool


@dataclass(frozen=True, slots=True)
class OptExportName(Event):
    name: str


@dataclass(frozen=True, slots=True)
class OptAbort(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptList(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptInfo(Event):
    """NBD_OPT_INFO or, with ``go``, NBD_OPT_GO."""

    name: str
    requests: tuple[int, ...]
    go: bool


@dataclass(frozen=True, slots=True)
class OptStructuredReply(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptStartTls(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptMetaContext(Event):
    """NBD_OPT_SET_META_CONTEXT or (``list_only``) NBD_OPT_LIST_META_CONTEXT."""

    export: str
    queries: tuple[str, ...]
    list_only: bool


@dataclass(frozen=True, slots=True)
class OptUnsupported(Event):
    option: int


@dataclass(frozen=True, slots=True)
class OptInvalid(Event):
    """A known option whose data is malformed; answer NBD_REP_ERR_INVALID."""

    option: int
    reason: str


# -- client -> server, transmission ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request(Event):
    cmd: int
    flags: int
    handle: int
    offset: int
    length: int
    data: Buffer | None = None  # the payload of a WRITE
    oversize: bool = False  # a WRITE payload above MAX_PAYLOAD, read and dropped


@dataclass(frozen=True, slots=True)
class Disconnect(Event):
    pass


# -- server -> client -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionReply(Event):
    option: int
    reply: Rep
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ExportNameReply(Event):
    """The answer to NBD_OPT_EXPORT_NAME; enters transmission."""

    size: int
    flags: int


@dataclass(frozen=True, slots=True)
class SimpleReply(Event):
    handle: int
    error: Errno = Errno.OK
    data: Sequence[Buffer] = ()


@dataclass(frozen=True, slots=True)
class ReadData(Event):
    """Data of a READ: a structured OFFSET_DATA chunk, or a simple reply."""

    handle: int
    offset: int
    data: Sequence[Buffer]
    done: bool = True


@dataclass(frozen=True, slots=True)
class ReadHole(Event):
    handle: int
    offset: int
    length: int
    done: bool = True


@dataclass(frozen=True, slots=True)
class ErrorReply(Event):
    handle: int
    error: Errno
    message: str = ""
    offset: int | None = None  # for ERROR_OFFSET


@dataclass(frozen=True, slots=True)
class BlockStatus(Event):
    handle: int
    context_id: int
    extents: Sequence[tuple[int, int]]  # (length, flags)
    done: bool = True


@dataclass(frozen=True, slots=True)
class Done(Event):
    """A final empty structured chunk (NBD_REPLY_TYPE_NONE)."""

    handle: int


@dataclass(frozen=True, slots=True)
class NeedData:
    """Returned by ``next_event`` when more bytes are needed."""


@dataclass(frozen=True, slots=True)
class Closed:
    """Returned by ``next_event`` once the session is over."""

    reason: str = field(default="")


NEED_DATA = NeedData()
