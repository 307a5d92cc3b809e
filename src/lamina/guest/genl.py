"""Generic netlink for the kernel's ``nbd`` family: the messages as bytes (pure), and one
small socket adapter.

What lamina sends and hears (``include/uapi/linux/nbd-netlink.h``, family ``nbd``,
version 1, multicast group ``nbd_mc_group``):

    NBD_CMD_RECONFIGURE   INDEX, TIMEOUT, DEAD_CONN_TIMEOUT, SOCKETS{SOCK_ITEM{SOCK_FD}}
    NBD_CMD_LINK_DEAD     INDEX (multicast: a device lost a connection)

A netlink message is ``nlmsghdr`` (length, type, flags, sequence, port; host byte order),
then for generic netlink ``genlmsghdr`` (command, version, 0), then attributes, each
``nlattr`` (length, type) and its payload, padded to 4 bytes.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from lamina.errors import ToolError

NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port
GENL = struct.Struct("=BBH")  # command, version, reserved
NLATTR = struct.Struct("=HH")  # length, type
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLA_F_NESTED = 1 << 15
SOL_NETLINK = 270
NETLINK_GENERIC = 16  # the protocol number (Python's socket module does not name it)
NETLINK_ADD_MEMBERSHIP = 1

# the controller: resolves a family's name to its id and multicast groups
GENL_ID_CTRL = 0x10
CTRL_NAME = "nlctrl"
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2

# the nbd family
NBD_FAMILY = "nbd"
NBD_VERSION = 1
NBD_GROUP = "nbd_mc_group"
NBD_CMD_RECONFIGURE = 3
NBD_CMD_LINK_DEAD = 4
NBD_ATTR_INDEX = 1
NBD_ATTR_TIMEOUT = 4
NBD_ATTR_SOCKETS = 7
NBD_ATTR_DEAD_CONN_TIMEOUT = 8
NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1


def attr(kind: int, payload: bytes) -> bytes:
    head = NLATTR.pack(NLATTR.size + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=Q", value))


def nested(kind: int, *items: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(items))


def attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without flags, payload) of each attribute in ``data``."""
    offset = 0
    while offset + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > len(data):
            raise ToolError(f"bad netlink attribute length {length}")
        yield kind & ~NLA_F_NESTED, data[offset + NLATTR.size : offset + length]
        offset += (length + 3) & ~3


def message(family: int, command: int, body: bytes, seq: int, *, version: int = 1) -> bytes:
    """A generic netlink request that asks for an acknowledgement."""
    payload = GENL.pack(command, version, 0) + body
    return (
        NLMSG.pack(NLMSG.size + len(payload), family, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload
    )


@dataclass(frozen=True, slots=True)
class Message:
    kind: int  # the family id, NLMSG_ERROR or NLMSG_DONE
    seq: int
    command: int  # generic netlink command (0 for NLMSG_ERROR/DONE)
    body: bytes  # the attributes; for NLMSG_ERROR the error code and the request echoed

    @property
    def error(self) -> int:
        """For an NLMSG_ERROR: 0 (an acknowledgement) or a negative errno."""
        return int(struct.unpack_from("=i", self.body)[0])


def messages(data: bytes) -> Iterator[Message]:
    offset = 0
    while offset + NLMSG.size <= len(data):
        length, kind, _flags, seq, _port = NLMSG.unpack_from(data, offset)
        if length < NLMSG.size or offset + length > len(data):
            raise ToolError(f"bad netlink message length {length}")
        payload = data[offset + NLMSG.size : offset + length]
        if kind in (NLMSG_ERROR, NLMSG_DONE):
            yield Message(kind, seq, 0, payload)
        else:
            yield Message(kind, seq, payload[0], payload[GENL.size :])
        offset += (length + 3) & ~3


def family_request(name: str, seq: int) -> bytes:
    return message(
        GENL_ID_CTRL, CTRL_CMD_GETFAMILY, attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"), seq
    )


def parse_family(body: bytes) -> tuple[int, dict[str, int]]:
    """A GETFAMILY reply: the family's id and its multicast groups by name."""
    family, groups = 0, {}
    for kind, payload in attrs(body):
        if kind == CTRL_ATTR_FAMILY_ID:
            family = struct.unpack_from("=H", payload)[0]
        elif kind == CTRL_ATTR_MCAST_GROUPS:
            for _index, group in attrs(payload):
                fields = dict(attrs(group))
                name = fields.get(CTRL_ATTR_MCAST_GRP_NAME, b"").rstrip(b"\0").decode()
                if CTRL_ATTR_MCAST_GRP_ID in fields:
                    groups[name] = struct.unpack_from("=I", fields[CTRL_ATTR_MCAST_GRP_ID])[0]
    if not family:
        raise ToolError("the netlink controller's reply names no family id")
    return family, groups


def reconfigure(
    index: int,
    *,
    timeout: int | None = None,
    dead_conn_timeout: int | None = None,
    fd: int | None = None,
) -> bytes:
    """NBD_CMD_RECONFIGURE's attributes: timeouts in seconds; ``fd`` a connected socket,
    past its handshake, that replaces the device's dead one."""
    body = u32(NBD_ATTR_INDEX, index)
    if timeout is not None:
        body += u64(NBD_ATTR_TIMEOUT, timeout)
    if dead_conn_timeout is not None:
        body += u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout)
    if fd is not None:
        body += nested(NBD_ATTR_SOCKETS, nested(NBD_SOCK_ITEM, u32(NBD_SOCK_FD, fd)))
    return body


def dead_index(msg: Message, family: int) -> int | None:
    """The device index of an NBD_CMD_LINK_DEAD event, or None for any other message."""
    if msg.kind != family or msg.command != NBD_CMD_LINK_DEAD:
        return None
    fields = dict(attrs(msg.body))
    return struct.unpack_from("=I", fields[NBD_ATTR_INDEX])[0] if NBD_ATTR_INDEX in fields else None


class NbdNetlink:
    """A generic netlink socket to the kernel's ``nbd`` family (``name``): requests, and
    (after ``subscribe``) its dead-link events."""

    def __init__(self, name: str = NBD_FAMILY) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self._seq = 0
        self._pending: list[Message] = []  # events read while waiting for a reply
        seq = self._next()
        reply = self._call(family_request(name, seq), seq, reply=True)
        self.family, self.groups = parse_family(reply.body)

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _call(self, data: bytes, seq: int, *, reply: bool) -> Message:
        """Send a request; its reply (``reply``) or its acknowledgement. A negative
        acknowledgement raises OSError with its errno."""
        self.sock.send(data)
        answer: Message | None = None
        while True:
            for msg in messages(self.sock.recv(65536)):
                if msg.seq != seq:
                    self._pending.append(msg)
                elif msg.kind == NLMSG_ERROR:
                    if msg.error:
                        raise OSError(-msg.error, os.strerror(-msg.error))
                    if not reply or answer is not None:
                        return answer or msg
                else:
                    answer = msg

    def request(self, command: int, body: bytes) -> None:
        seq = self._next()
        self._call(message(self.family, command, body, seq, version=NBD_VERSION), seq, reply=False)

    def subscribe(self) -> None:
        if NBD_GROUP not in self.groups:
            raise ToolError(f"the kernel's nbd family has no {NBD_GROUP} group")
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, self.groups[NBD_GROUP])

    def events(self) -> Iterator[Message]:
        """Messages as they come (blocking)."""
        while True:
            while self._pending:
                yield self._pending.pop(0)
            yield from messages(self.sock.recv(65536))

    def drain(self, seconds: float) -> list[Message]:
        """What arrives within ``seconds`` (events the kernel sends together)."""
        out, self._pending = self._pending, []
        self.sock.settimeout(seconds)
        try:
            while True:
                out.extend(messages(self.sock.recv(65536)))
        except TimeoutError:
            return out
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        self.sock.close()
