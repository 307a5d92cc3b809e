"""The manager, seen from a stream endpoint: one pooled HTTP/1.1 client (httpx, async).

Errors come in two kinds: ``Unreachable`` (connection refused or reset, timeouts, 429 and
5xx: the network or the manager is away, try again later) and the other lamina errors for
answers that will not change by retrying (``Refused`` for 401/403, 404, 409), each made by
``lamina.errors.from_http``, the table every HTTP client of the manager uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from lamina.errors import ProtocolError, Unreachable, from_http

API = "/api/v1"


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise from_http(response.status_code, response.content, what=what)


class Remote:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        connections: int = 8,
        timeout: float = 15.0,
        ca: Path | None = None,
    ) -> None:
        from lamina.trust.contexts import client_context

        self.url = url.rstrip("/")
        self.ca = ca  # the CA an https:// manager's certificate must chain to
        self.client = httpx.AsyncClient(
            verify=client_context(ca) if self.url.startswith("https:") else True,
            base_url=self.url + API,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "lamina-stream"},
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def _request(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"{what}: {type(exc).__name__}: {exc or 'no answer'}") from None
        _raise_for(response, what)
        return response

    async def _json(self, path: str, what: str) -> dict[str, Any]:
        response = await self._request("GET", path, what)
        try:
            data = response.json()
        except ValueError:
            raise ProtocolError(f"{what}: not JSON") from None
        if not isinstance(data, dict):
            raise ProtocolError(f"{what}: unexpected answer")
        return data

    # -- what is streamed ------------------------------------------------------------

    async def image_info(self, name: str, version: int | None) -> dict[str, Any]:
        query = f"?version={version}" if version is not None else ""
        return await self._json(f"/stream/images/{name}{query}", f"image {name}")

    async def machine_info(self, name: str) -> dict[str, Any]:
        return await self._json(f"/stream/machines/{name}", f"machine {name}")

    async def manifest(self, name: str, version: int) -> bytes:
        path = f"/images/{name}/versions/{version}/manifest"
        return (await self._request("GET", path, f"manifest of {name}@{version}")).content

    async def profile(self, name: str, version: int) -> list[int]:
        data = await self._json(
            f"/images/{name}/versions/{version}/profile", f"boot profile of {name}@{version}"
        )
        chunks = data.get("chunks", [])
        if not isinstance(chunks, list) or not all(isinstance(i, int) for i in chunks):
            raise ProtocolError("boot profile: chunks must be a list of integers")
        return chunks

    # -- chunks ----------------------------------------------------------------------

    async def chunk(self, cid: bytes, *, fresh: bool = False) -> bytes:
        """One chunk's envelope (unverified: the caller checks it). ``fresh`` asks any
        HTTP cache on the way for a new copy (after a corrupt one)."""
        headers = {"Cache-Control": "no-cache"} if fresh else {}
        response = await self._request(
            "GET", f"/chunks/{cid.hex()}", f"chunk {cid.hex()[:16]}", headers=headers
        )
        return response.content

    # -- machine deltas ----------------------------------------------------------------

    async def machine_delta(self, name: str) -> bytes:
        path = f"/stream/machines/{name}/delta"
        return (await self._request("GET", path, f"delta of {name}")).content

    async def machine_seed(self, name: str) -> bytes:
        path = f"/stream/machines/{name}/seed"
        return (await self._request("GET", path, f"seed of {name}")).content

    async def upload_state(self, name: str, upload_id: str) -> dict[str, Any]:
        return await self._json(
            f"/stream/machines/{name}/uploads/{upload_id}", f"upload {upload_id}"
        )

    async def upload_part(self, name: str, upload_id: str, offset: int, data: bytes) -> int:
        response = await self._request(
            "PUT",
            f"/stream/machines/{name}/uploads/{upload_id}",
            f"upload {upload_id}",
            params={"offset": offset},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return int(response.json()["received"])

    async def apply(self, name: str, upload_id: str, size: int, digest: str) -> dict[str, Any]:
        response = await self._request(
            "POST",
            f"/stream/machines/{name}/uploads/{upload_id}/apply",
            f"apply upload {upload_id}",
            json={"size": size, "blake3": digest},
        )
        data = response.json()
        assert isinstance(data, dict)
        return data
