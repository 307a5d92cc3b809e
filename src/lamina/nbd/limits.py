"""What one NBD server lets its clients cost it, whoever they are: connections per client
address, how long a handshake and an idle connection may last, and the bytes of replies
produced but not yet taken by the client (read from disk and waiting to be sent).

A client that pipelines large reads and never reads a reply would otherwise make the
server hold every reply: 40 reads of 32 MiB (1,120 bytes sent) cost 1.49 GB, three such
clients 4.86 GB. With these limits a connection whose unsent replies reach
``reply_bytes`` is not read from until they drain below it, every connection waits
while the server's total reaches ``total_reply_bytes``, and a connection whose
client takes none of its replies for ``stall_timeout`` seconds is dropped.

``Budget`` is the server-wide account (one per server, used from its event loop only);
each connection settles its own share (``settle``) whenever it may have changed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    # Connections from one client address at once. Generous: a hypervisor host behind NAT
    # runs many machines, each with a disk, a seed and (multi-conn) several connections.
    connections_per_address: int = 512
    # Seconds from accept to the end of the handshake (qemu-nbd's --handshake-limit is 10).
    handshake_timeout: float = 10.0
    # Seconds without a request before an open export is closed; 0 keeps idle
    # connections: qemu's NBD client does not reconnect by default, so a VM whose idle
    # disk connection is closed sees I/O errors.
    idle_timeout: float = 0.0
    # Seconds a client may leave its replies unread (not one byte taken) before it is
    # dropped.
    stall_timeout: float = 30.0
    # Unsent reply bytes (read, queued or in flight) past which one connection is not read.
    # 32 MiB is one largest request: qemu (16 requests in flight) and nbdcopy (64 of
    # 256 KiB) stay well under it.
    reply_bytes: int = 32 * MiB
    # The same, summed over every connection of the server.
    total_reply_bytes: int = 64 * MiB


class Debtor(Protocol):
    """A connection with a share of the budget."""

    def settle(self) -> None:
        """Recompute its share (``Budget.set``) from what it holds now."""

    def wake(self) -> None:
        """The budget has room again: go on serving."""


class Budget:
    """Connections per address and unsent reply bytes, over every connection of one
    server (event loop only)."""

    RECHECK = 0.05  # seconds between re-settlements while someone waits for room

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._addresses: Counter[str] = Counter()
        self._shares: dict[Debtor, int] = {}
        self.used = 0
        self._waiting: dict[Debtor, None] = {}  # in order of arrival
        self._recheck: asyncio.TimerHandle | None = None

    # -- connections --------------------------------------------------------------------

    def admit(self, address: str) -> bool:
        """Count one more connection from ``address``; False when it has too many."""
        if self._addresses[address] >= self.limits.connections_per_address:
            return False
        self._addresses[address] += 1
        return True

    def leave(self, address: str) -> None:
        self._addresses[address] -= 1
        if self._addresses[address] <= 0:
            del self._addresses[address]

    # -- reply bytes --------------------------------------------------------------------

    def full(self) -> bool:
        return self.used >= self.limits.total_reply_bytes

    def set(self, debtor: Debtor, share: int) -> None:
        """``debtor`` now holds ``share`` bytes of unsent replies."""
        old = self._shares.pop(debtor, 0)
        if share:
            self._shares[debtor] = share
        self.used += share - old
        if share < old and self._waiting and not self.full():
            self._wake()

    def wait(self, debtor: Debtor) -> None:
        """``debtor`` waits for room (``wake`` is called when there is some)."""
        self._waiting[debtor] = None
        if self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(self.RECHECK, self._tick)

    def forget(self, debtor: Debtor) -> None:
        self._waiting.pop(debtor, None)
        self.set(debtor, 0)

    def _tick(self) -> None:
        """Shares shrink without telling (a transport's buffer drains on its own): while
        connections wait, settle every share again, then wake them if there is room."""
        self._recheck = None
        for debtor in list(self._shares):
            debtor.settle()
        if self._waiting:
            if self.full():
                self._recheck = asyncio.get_running_loop().call_later(self.RECHECK, self._tick)
            else:
                self._wake()

    def _wake(self) -> None:
        """Each waiting connection goes on at the loop's next turn (not from inside the
        call that made room: a thousand waiting connections would nest a thousand deep)."""
        waiting, self._waiting = list(self._waiting), {}
        loop = asyncio.get_running_loop()
        for debtor in waiting:
            loop.call_soon(debtor.wake)


def call_later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle | None:
    """A timer on the running loop, or None for a delay of 0 (off)."""
    if delay <= 0:
        return None
    return asyncio.get_running_loop().call_later(delay, callback)
