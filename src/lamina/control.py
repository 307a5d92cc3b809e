"""Control sockets: one JSON line asked over a unix socket, one JSON line answered.

The running stream endpoint and the agent each listen on one; the CLI asks them. An answer
is ``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT, "code": EXIT_CODE}``.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

from lamina.errors import LaminaError


def abstract_address(kind: str, folder: Path) -> str:
    """An abstract unix socket address for the ``kind`` server working on ``folder``
    (abstract: no path length limit, nothing left behind by a ``kill -9``)."""
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:24]
    return f"\0lamina-{kind}-{key}"


class NotListening(Exception):
    """Nothing accepts connections at the address (its text: why the connect failed)."""


def ask(address: str, message: dict[str, Any], *, timeout: float | None, hung_up: str) -> Any:
    """Send ``message``, return the answer; a refusal raises ``LaminaError`` with the
    answer's exit code, an empty answer raises one saying ``hung_up``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            raise NotListening(exc.strerror or str(exc)) from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            piece = sock.recv(1 << 16)
            if not piece:
                break
            data += piece
    answer: dict[str, Any] = json.loads(data) if data else {"ok": False, "error": hung_up}
    if not answer.get("ok"):
        error = LaminaError(str(answer.get("error", hung_up)))
        error.exit_code = int(answer.get("code", 1))
        raise error
    return answer
