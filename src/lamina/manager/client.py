"""A small client of the manager's HTTP API (the CLI's ``--manager`` mode and the agent).

HTTP errors come back as lamina's errors through ``lamina.errors.from_http`` (the kind
named in the answer's body, else the status), so a command prints the same one line
whether it ran on the embedded database or remotely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from lamina.errors import Unreachable, from_http

__all__ = ["ManagerClient"]


class ManagerClient:
    def __init__(
        self, url: str, token: str, *, timeout: float = 30.0, ca: Path | None = None
    ) -> None:
        from lamina.trust.contexts import client_context

        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=f"{self.url}/api/v1",
            verify=client_context(ca) if self.url.startswith("https:") else True,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"manager {self.url}: {exc or type(exc).__name__}") from None
        if response.status_code >= 400:
            raise from_http(response.status_code, response.content, what=f"manager {self.url}")
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        return response.json() if response.content else None

    def pages(self, path: str, **params: Any) -> list[Any]:
        """Every item of a paged list."""
        items: list[Any] = []
        while True:
            page = self.json("GET", path, params={**params, "offset": len(items), "limit": 1000})
            items += page["items"]
            if not page["items"] or len(items) >= page["total"]:
                return items

    def close(self) -> None:
        self.http.close()
