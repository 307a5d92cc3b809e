"""A small client of the manager's HTTP API (the CLI's ``--manager`` mode and the agent).

HTTP errors come back as lamina's errors (404 NotFound, 409 Conflict, 422 UsageError, ...),
so a command prints the same one line whether it ran on the embedded database or remotely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from lamina.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    LaminaError,
    NotFound,
    ProtocolError,
    UsageError,
)


class Unreachable(ProtocolError):
    """The manager did not answer (connection refused, reset, timed out, 5xx)."""


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):  # pydantic validation errors
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
        )
    return str(detail or response.reason_phrase)


def error_of(response: httpx.Response) -> LaminaError:
    detail = _detail(response)
    code = response.status_code
    if code == 404:
        return NotFound(detail)
    if code == 409:
        return AlreadyExists(detail) if "already" in detail else Conflict(detail)
    if code == 422:
        return UsageError(detail) if "upload" not in detail else InvalidInput(detail)
    if code in (401, 403):
        return LaminaError(f"manager refused the token: {detail}")
    if code >= 500:
        return Unreachable(f"manager error {code}: {detail}")
    return ProtocolError(f"manager answered {code}: {detail}")


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
            raise error_of(response)
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
