"""Manifests and chunks over real HTTP (lamina serve on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from lamina.image import Manifest
from lamina.store import codec
from tests.conftest import Cli, write_sparse
from tests.servers import Server


def test_manifest_and_chunks_with_tokens_and_etags(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    src = write_sparse(tmp_path / "d.raw", 4 << 20, [(0, os.urandom(1 << 20))])
    cli("image", "import", "base", str(src))
    cli("image", "import", "other", str(src))
    token = cli.json("machine", "add", "m1", "--image", "base")["token"]
    admin = cli("admin", "token").out.strip()
    server.start()
    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    with httpx.Client(base_url=base) as http:
        assert http.get("/images/base/versions/1/manifest").status_code == 401
        assert (
            http.get(
                "/images/base/versions/1/manifest", headers={"Authorization": "Bearer nope"}
            ).status_code
            == 401
        )
        ok = http.get(
            "/images/base/versions/1/manifest", headers={"Authorization": f"Bearer {token}"}
        )
        assert ok.status_code == 200 and "immutable" in ok.headers["cache-control"]
        manifest = Manifest.from_bytes(ok.content)
        assert manifest.size == 4 << 20
        etag = ok.headers["etag"]
        again = http.get(
            "/images/base/versions/1/manifest",
            headers={"Authorization": f"Bearer {token}", "If-None-Match": etag},
        )
        assert again.status_code == 304
        # a machine token opens only its own image
        assert (
            http.get(
                "/images/other/versions/1/manifest", headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 403
        )
        assert (
            http.get(
                "/images/base/versions/9/manifest", headers={"Authorization": f"Bearer {admin}"}
            ).status_code
            == 404
        )
        cid = manifest.id_at(1)  # the second 256 KiB of the file
        chunk = http.get(f"/chunks/{cid.hex()}", headers={"Authorization": f"Bearer {token}"})
        assert chunk.status_code == 200 and chunk.headers["etag"] == f'"{cid.hex()}"'
        size = manifest.chunk_size
        assert codec.decode(chunk.content, expected=cid) == src.read_bytes()[size : 2 * size]
        assert (
            http.get(
                f"/chunks/{'0' * 63}x", headers={"Authorization": f"Bearer {admin}"}
            ).status_code
            == 404
        )
        assert (
            http.get(
                f"/chunks/{'ab' * 32}", headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 403
        )
        assert (
            http.get(
                f"/chunks/{'ab' * 32}", headers={"Authorization": f"Bearer {admin}"}
            ).status_code
            == 404
        )
