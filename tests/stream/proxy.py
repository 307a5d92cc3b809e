"""A misbehaving HTTP proxy in front of the manager, for tests (127.0.0.1 only).

It forwards every request and, as told through its attributes, flips a byte in chunk
responses, answers 502 as if the manager were away, or loses a sync's apply before or
after the manager saw it, or holds it until released.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


class Proxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.corrupt_left = 0  # chunk responses still to damage
        self.corrupted = 0
        self.down = False  # answer 502 to everything
        self.apply_mode = "pass"  # pass | fail-before | fail-after | hold
        self.applies = 0
        self.released = threading.Event()
        self.held = threading.Event()
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.down:
                    self._reply(502, b'{"detail": "proxy: upstream down"}', {})
                    return
                is_apply = self.command == "POST" and self.path.endswith("/apply")
                if is_apply:
                    proxy.applies += 1
                    if proxy.apply_mode == "fail-before":
                        self._reply(502, b'{"detail": "proxy: lost"}', {})
                        return
                    if proxy.apply_mode == "hold":
                        proxy.held.set()
                        proxy.released.wait(60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP | {"host"}}
                answer = proxy._client.request(
                    self.command, proxy.upstream + self.path, content=body, headers=headers
                )
                data = answer.content
                if is_apply and proxy.apply_mode == "fail-after":
                    self._reply(502, b'{"detail": "proxy: answer lost"}', {})
                    return
                if answer.status_code == 200 and "/chunks" in self.path and len(data) > 100:
                    with proxy._lock:
                        damage = proxy.corrupt_left > 0
                        if damage:
                            proxy.corrupt_left -= 1
                            proxy.corrupted += 1
                    if damage:
                        flipped = bytearray(data)
                        flipped[len(data) // 2] ^= 0xFF  # inside a payload, not a header
                        data = bytes(flipped)
                self._reply(answer.status_code, data, dict(answer.headers))

            do_GET = do_PUT = do_POST = _handle  # noqa: N815 (http.server names)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self._client.close()
