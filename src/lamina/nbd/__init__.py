"""NBD: the protocol as sans-I/O state machines, pure negotiation rules, asyncio adapters.

constants.py   protocol numbers (the NBD spec's proto.md)
events.py      what each side says, as events
server.py      ServerConnection: bytes in -> events; replies -> bytes (server side)
client.py      ClientConnection: the same for the client side
negotiate.py   negotiate (the replies to a handshake event for an export catalogue) and
               check_request (which requests an export refuses, with which error)
batch.py       transmission requests parsed in batches as tuples, for a server's hot path
device.py      BlockDevice, the one interface between the server and what it serves
limits.py      what a client may cost a server (Limits) and the server-wide Budget
lanes.py       threads that run each connection's writes in order, off the event loop
flow.py        FlowControl: one connection's budgets, timeouts and event pump
aio.py         NbdServerProtocol, the asyncio server adapter over FlowControl (and its
               hold, for backups)
aioclient.py   NbdClient, a small asyncio client for lamina's tools and tests
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
