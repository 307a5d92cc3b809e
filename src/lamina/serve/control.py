"""The block server's control socket: what ``lamina backup`` asks a running ``lamina serve``.

One JSON line asked, one answered (``lamina.control``), on an abstract unix socket named
after the home (nothing to clean up after a ``kill -9``), from this user or root only:

    {"op": "copy-deltas", "dest": DIR}   ->  {"ok": true, "deltas": [NAME, ...]}

Each machine's delta is copied at a flush point, one machine at a time. The serving
process that has a machine open (this one, or the worker holding it) stops taking its
connections' requests (their writes wait in the sockets), lets the writes it took reach
the delta, flushes and copies it, and takes requests again; nobody may start writing that
disk meanwhile (``NbdService.copy_delta``). A delta no process has open is copied here
under its lock; a client opening it in that moment is refused, and its next try works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from lamina import logs
from lamina.control import abstract_address
from lamina.delta.file import copy_files, exclusive
from lamina.errors import Conflict, LaminaError, UsageError
from lamina.names import MACHINE_PREFIX

# A delta opened by a client between the check and the lock: tried again this often.
_ATTEMPTS = 20


def address(home_root: Path) -> str:
    return abstract_address("serve", home_root)


# Asked of the serving processes: copy this machine's open delta (False: none has it open).
CopyOpen = Callable[[str, Path, Path], Awaitable[bool]]


class Control:
    def __init__(self, home_root: Path, deltas: Path, copy_open: CopyOpen, log: logging.Logger):
        self.home_root = home_root
        self.deltas = deltas
        self.copy_open = copy_open
        self.log = log

    async def start(self) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self.handle, path=address(self.home_root))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline() or b"{}")
            op = request.get("op")
            if not _same_user(writer):
                answer: dict[str, Any] = {"ok": False, "error": "not its user", "code": 12}
            elif op == "copy-deltas":
                answer = {"ok": True, "deltas": await self.copy_deltas(Path(request["dest"]))}
            else:
                answer = {"ok": False, "error": f"unknown request {op!r}", "code": 2}
        except LaminaError as exc:
            answer = {"ok": False, "error": str(exc), "code": exc.exit_code}
        except (ValueError, KeyError, OSError) as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "code": 1}
        with contextlib.suppress(OSError):
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
            writer.close()

    async def copy_deltas(self, dest: Path) -> list[str]:
        if not dest.is_absolute():
            raise UsageError(f"{dest}: the destination must be an absolute path")
        names = sorted(d.name for d in self.deltas.iterdir() if (d / "delta.map").exists())
        for name in names:
            await self._copy(MACHINE_PREFIX + name, self.deltas / name, dest / name)
        logs.event(self.log, "deltas-copied", dest=str(dest), deltas=len(names))
        return names

    async def _copy(self, export: str, src: Path, dest: Path) -> None:
        for _attempt in range(_ATTEMPTS):
            if await self.copy_open(export, src, dest):
                return
            try:
                await asyncio.to_thread(_copy_closed, src, dest)
                return
            except Conflict:  # a process opened it just now: ask again
                await asyncio.sleep(0.05)
        raise Conflict(f"{export}: opened and closed too often to be copied, try again")


def _copy_closed(src: Path, dest: Path) -> None:
    with exclusive(src):
        copy_files(src, dest)


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """The peer of a control connection runs as this process's user (or root)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())
