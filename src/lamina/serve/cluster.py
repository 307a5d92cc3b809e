"""A block server in a cluster: its row in the database, refreshed while it serves.

``lamina serve --server-name NAME [--advertise HOST:PORT]`` registers before it accepts
its first NBD connection, beats every ``heartbeat`` seconds (each beat also moves the
stateless machines of lost servers, see ``manager.services.servers``) and clears its
heartbeat when it stops cleanly. A beat that fails (the database away for a moment) is
logged and retried at the next one; the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from lamina import logs
from lamina.home import Home
from lamina.manager.services import servers


def advertised(nbd: tuple[str, int], advertise: str | None) -> str:
    """The address clients dial: ``--advertise``, else the listen address (this host's
    name when it listens on every address)."""
    if advertise:
        return advertise
    host = nbd[0]
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"[{host}]:{nbd[1]}" if ":" in host else f"{host}:{nbd[1]}"


async def join(
    home: Home, name: str, address: str, heartbeat: float, log: logging.Logger
) -> Callable[[], Awaitable[None]]:
    """Register and start beating; returns what stops the beat and leaves cleanly."""

    def register() -> None:
        with home.session() as session:
            servers.register(session, name=name, nbd_address=address, heartbeat=heartbeat)
        servers.remember_home(home, name)

    def beat() -> int:
        with home.session() as session:
            if not servers.beat(session, name=name):
                servers.register(session, name=name, nbd_address=address, heartbeat=heartbeat)
        with home.session() as session:
            return servers.sweep(session)

    await asyncio.to_thread(register)
    logs.event(log, "joined", server=name, nbd_address=address, heartbeat=heartbeat)

    async def loop() -> None:
        while True:
            await asyncio.sleep(heartbeat)
            try:
                moved = await asyncio.to_thread(beat)
            except Exception as exc:  # the database away: serve on, beat again later
                logs.event(log, "heartbeat failed", level=logging.WARNING, error=str(exc))
                continue
            if moved:
                logs.event(log, "machines moved from lost servers", machines=moved)

    task = asyncio.create_task(loop())

    async def leave() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        def stop() -> None:
            with home.session() as session:
                servers.stop(session, name=name)

        try:
            await asyncio.to_thread(stop)
        except Exception as exc:
            logs.event(log, "leaving the cluster failed", level=logging.WARNING, error=str(exc))

    return leave
