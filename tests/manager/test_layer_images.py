"""GET /layers/N/versions/V/image over real HTTP: the image is built once and recorded
(the same answer every time), only machines the version is entitled to may have it or
read its chunks, and the store's gc keeps what the image references."""

from __future__ import annotations

from pathlib import Path

import httpx

from lamina.home import Home
from lamina.image import Manifest
from tests.conftest import Cli, write_sparse
from tests.servers import Server
from tests.trees import needs_root, write_tree

pytestmark = needs_root  # the manager writes the tree out as its owners (mkfs.erofs input)


def client(url: str, token: str) -> httpx.Client:
    # the first image request builds it: seconds on a loaded host
    return httpx.Client(
        base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=120
    )


def test_the_image_is_built_once_and_only_entitled_machines_read_it(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    cli("image", "import", "base", str(write_sparse(tmp_path / "d.raw", 1 << 20, [])))
    m1 = cli.json("machine", "add", "m1", "--image", "base")["token"]
    m2 = cli.json("machine", "add", "m2", "--image", "base")["token"]
    files = {f"opt/app/f{i}": f"file {i}\n" * 300 for i in range(50)}  # > 64 KiB
    manifest = cli.json("layer", "import", "app", str(write_tree(tmp_path / "src", files)))[
        "manifest"
    ]
    cli("entitle", "app", "--machine", "m1")
    server.start()
    one, two = client(server.http_url, m1), client(server.http_url, m2)
    first = one.get("/layers/app/versions/1/image")
    assert first.status_code == 200, first.text
    image = first.json()
    assert image["manifest"] == manifest and image["layer"] == "app@1"
    assert image["chunk_size"] == 64 << 10 and image["size"] % 4096 == 0
    assert one.get("/layers/app/versions/1/image").json() == image  # recorded, not rebuilt

    assert two.get("/layers/app/versions/1/image").status_code == 403
    assert two.get(f"/chunks/{image['image']}").status_code == 403
    table = one.get(f"/chunks/{image['image']}")
    assert table.status_code == 200
    home = Home(cli.home)
    try:
        parsed = Manifest.from_bytes(home.store.get(bytes.fromhex(image["image"])))
    finally:
        home.close()
    some = sorted(parsed.referenced())[0].hex()
    assert one.get(f"/chunks/{some}").status_code == 200
    assert two.get(f"/chunks/{some}").status_code == 403

    # a profile from a session is merged; the image's chunks survive a gc
    last = parsed.count - 1
    assert last > 0
    put = one.put("/layers/app/versions/1/profile", json={"chunks": [last, 0, last, 99999]})
    assert put.json() == {"merged": True, "runs": 1}
    assert one.get("/layers/app/versions/1/image").json()["profile"] == [last, 0]
    server.stop()
    cli("store", "gc")
    server.start()
    assert one.get(f"/chunks/{some}").status_code == 200
