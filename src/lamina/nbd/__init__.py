"""NBD: the protocol as sans-I/O state machines, pure negotiation rules, asyncio adapters.

ServerConnection   bytes in -> events; replies -> bytes (server side)
ClientConnection   the same for the client side
negotiate          the replies to a handshake event for an export catalogue
check_request      which requests an export refuses, and with which error
"""

from lamina.nbd.client import ClientConnection
from lamina.nbd.constants import Cmd, CmdFlag, Errno, Opt, Rep, State, TransmissionFlag
from lamina.nbd.negotiate import Catalog, Decision, ExportInfo, check_request, negotiate
from lamina.nbd.server import Phase, ServerConnection

__all__ = [
    "Catalog",
    "ClientConnection",
    "Cmd",
    "CmdFlag",
    "Decision",
    "Errno",
    "ExportInfo",
    "Opt",
    "Phase",
    "Rep",
    "ServerConnection",
    "State",
    "TransmissionFlag",
    "check_request",
    "negotiate",
]
