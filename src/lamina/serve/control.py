"""The block server's control socket: what ``lamina backup`` asks a running ``lamina serve``.

One JSON line asked, one answered (``lamina.control``), on an abstract unix socket named
after the home (nothing to clean up after a ``kill -9``), from this user or root only:

    {"op": "copy-deltas", "dest": DIR}   ->  {"ok": true, "deltas": [NAME, ...]}

Each machine's delta is copied at a flush point, one machine at a time. For a machine
being served, the server stops reading its connections' requests (their writes wait in
the sockets), flushes the delta, copies its files on the pool and reads on; nobody may
start writing that disk meanwhile (``ExportCatalog.copying``). A delta no connection has
open is copied under its lock, and a client opening it meanwhile is refused until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from lamina import logs
from lamina.control import abstract_address
from lamina.delta.file import copy_files, exclusive
from lamina.errors import Conflict, LaminaError, UsageError
from lamina.names import MACHINE_PREFIX
from lamina.nbd.aio import NbdServerProtocol
from lamina.serve.catalog import ExportCatalog

# A delta opened by a client between the check and the lock: tried again this often.
_ATTEMPTS = 20


def address(home_root: Path) -> str:
    return abstract_address("serve", home_root)


class Control:
    def __init__(
        self,
        catalog: ExportCatalog,
        connections: Callable[[], Iterable[NbdServerProtocol]],
        executor: Executor,
        log: logging.Logger,
    ) -> None:
        self.catalog = catalog
        self.connections = connections
        self.executor = executor
        self.log = log

    async def start(self) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self.handle, path=address(self.catalog.home.root))

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
        deltas = self.catalog.home.deltas_dir
        names = sorted(d.name for d in deltas.iterdir() if (d / "delta.map").exists())
        for name in names:
            await self._copy(name, deltas / name, dest / name)
        logs.event(self.log, "deltas-copied", dest=str(dest), deltas=len(names))
        return names

    async def _copy(self, name: str, src: Path, dest: Path) -> None:
        loop = asyncio.get_running_loop()
        export = MACHINE_PREFIX + name
        with self.catalog.copying(export):
            for _attempt in range(_ATTEMPTS):
                device = self.catalog.opened(export)
                if device is None:
                    try:
                        await loop.run_in_executor(self.executor, _copy_closed, src, dest)
                        return
                    except Conflict:  # opened just now: copy it as an open one
                        await asyncio.sleep(0.05)
                        continue
                held = [p for p in self.connections() if p.export and p.export.name == export]
                for proto in held:
                    proto.hold()
                try:
                    await loop.run_in_executor(self.executor, device.flush)
                    await loop.run_in_executor(self.executor, copy_files, src, dest)
                    return
                except (OSError, ValueError):
                    if self.catalog.opened(export) is device:
                        raise
                    # its last client left meanwhile and closed it: copy it as a closed one
                finally:
                    for proto in held:
                        proto.unhold()
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
