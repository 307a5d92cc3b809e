"""The agent's own files and its control socket on a host (whether or not the agent runs):
``agent/pending/`` (logouts still to hand over to the manager), ``agent/pending/failed/``
(those it refused), ``run/agent.sock`` (``lamina agent login``/``logout``, root only)."""

from __future__ import annotations

import json
import os
import socketserver
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lamina.agent import lazy
from lamina.errors import LaminaError
from lamina.home import Home


def pending_dir(home: Home) -> Path:
    return home.root / "agent" / "pending"


def failed_dir(home: Home) -> Path:
    return pending_dir(home) / "failed"


def socket_path(home: Home) -> Path:
    return home.root / "run" / "agent.sock"


def control_server(
    handle: Callable[[dict[str, Any]], dict[str, Any]], path: Path
) -> socketserver.ThreadingUnixStreamServer:
    """The control socket at ``path``, root's only: one JSON request a line, answered by
    ``handle`` (a ``LaminaError`` as its message and exit code)."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                request = json.loads(self.rfile.readline() or b"{}")
                reply: dict[str, Any] = {"ok": True, "result": handle(request)}
            except LaminaError as exc:
                reply = {"ok": False, "error": str(exc), "code": exc.exit_code}
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "code": 1}
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    old = os.umask(0o077)
    try:
        server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    finally:
        os.umask(old)
    server.daemon_threads = True
    return server


def status(home: Home) -> dict[str, Any]:
    """What the agent holds on this host, from its files (whether or not it runs):
    logouts still to hand over, and those the manager refused (``pending/failed/``)."""
    identity = home.root / "agent" / "identity.json"
    machine = json.loads(identity.read_text()).get("machine") if identity.exists() else None
    pending = pending_dir(home)
    failed = failed_dir(home)
    return {
        "machine": machine,
        "pending_logouts": sorted(p.stem for p in pending.glob("*.json")),
        "refused_logouts": [
            json.loads(p.read_text()) | {"file": str(p)} for p in sorted(failed.glob("*.json"))
        ],
        "lazy_layers": lazy.status(home),
    }


def request(home: Home, op: str, user: str, *, timeout: float = 600) -> dict[str, Any]:
    """Ask the running agent to log ``user`` in or out (what ``lamina agent login`` does)."""
    from lamina import control

    path = socket_path(home)
    message = {"op": op, "user": user}
    try:
        reply = control.ask(str(path), message, timeout=timeout, hung_up="the agent hung up")
    except control.NotListening as exc:
        raise LaminaError(f"no agent runs on {home.root} ({path}: {exc})") from None
    result: dict[str, Any] = reply["result"]
    return result
