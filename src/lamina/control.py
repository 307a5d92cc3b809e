"""Control sockets: one JSON line asked over a unix socket, one JSON line answered.

The running stream endpoint and the agent each listen on one; the CLI asks them. An answer
is ``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT, "code": EXIT_CODE}``.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from lamina.errors import LaminaError


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
