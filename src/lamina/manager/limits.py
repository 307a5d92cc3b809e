"""What an HTTP request may cost the manager before anyone knows who sent it, and what an
error answers with.

- **Bodies are bounded before authentication, by kind.** FastAPI reads and parses a JSON
  body before its handler's dependencies ask for a token: a 400 MB body with no token
  cost 1.2 GB of RSS and stalled the loop while it parsed, before the 401. Here a body
  announced larger than the cap is refused from its headers, and one without a length
  is read up to the cap and refused past it, before the application sees the request.
  The cap is ``BODY_BYTES`` (1 MiB: the largest JSON an agent sends is 10,000 chunk ids,
  670 KB), except on the upload routes, whose handlers check the token first and then
  read their bodies themselves under their own larger caps (``UPLOADS``).
- **Errors never echo their input.** FastAPI's 422 lists each invalid value back: 50 MB
  in, 50 MB out, and a NaN in the input made the error itself fail (500). Here a 422
  says where and what (``loc``, ``msg``, ``type``, at most ten of them, each cut short).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lamina import settings as config
from lamina.manager.routers.agent import MAX_UPLOAD
from lamina.manager.routers.stream import MAX_PART

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_BYTES = 1 << 20
# Routes that authenticate before they read their bodies, and read them under these caps.
UPLOADS: list[tuple[str, re.Pattern[str], int]] = [
    ("POST", re.compile(r"/api/v1/chunks"), MAX_UPLOAD),
    ("PUT", re.compile(r"/api/v1/stream/machines/[^/]+/uploads/[^/]+"), MAX_PART),
]
_ERRORS_SHOWN = 10
_TEXT = 200  # characters of a message or location part shown


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"


class BodyLimit:
    """ASGI middleware: request bodies bounded before the application runs."""

    def __init__(self, app: App, cap: int = BODY_BYTES) -> None:
        self.app = app
        self.cap = cap

    @staticmethod
    def default_cap() -> int:
        """``LAMINA_HTTP_BODY_BYTES``, else ``BODY_BYTES``."""
        return config.load().http_body_bytes or BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = next(
            (
                cap
                for m, path, cap in UPLOADS
                if m == scope["method"] and path.fullmatch(scope["path"])
            ),
            None,
        )
        cap = upload if upload is not None else self.cap
        declared = _content_length(scope)
        if declared is not None and declared > cap:
            await _too_large(send, cap)
            return
        if upload is not None:  # the handler authenticates, then reads under the cap
            await self.app(scope, receive, send)
            return
        first = await _buffered(receive, cap)
        if first is None:
            await _too_large(send, cap)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _buffered(receive: Receive, cap: int) -> Message | None:
    """The whole body as one message (None once it passes ``cap``); a disconnect as is."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return message
        body += message.get("body", b"")
        if len(body) > cap:
            return None
        if not message.get("more_body", False):
            return {"type": "http.request", "body": bytes(body), "more_body": False}


async def _too_large(send: Send, cap: int) -> None:
    response = JSONResponse(
        {"detail": f"request body larger than {_size(cap)}", "kind": "LimitExceeded"},
        status_code=413,
        headers={"Connection": "close"},  # the rest of the body is not read
    )
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _cut(text: object) -> str:
    s = str(text)
    return s if len(s) <= _TEXT else s[:_TEXT] + "..."


def invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    """A 422 that says where and what, never the value given."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [
        {
            "loc": [_cut(part) for part in error.get("loc", ())][:8],
            "msg": _cut(error.get("msg", "")),
            "type": _cut(error.get("type", "")),
        }
        for error in errors[:_ERRORS_SHOWN]
    ]
    body: dict[str, Any] = {"detail": detail}
    if len(errors) > _ERRORS_SHOWN:
        body["errors"] = len(errors)
    return JSONResponse(body, status_code=422)
