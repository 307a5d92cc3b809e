"""Authorization by reference, not by existence: a machine reads only the chunks of what
it may read, saves a writable layer only with chunks it uploaded or may read already,
loses a layer the moment its entitlement is taken back, and learns nothing of the store
from ``/chunks/missing``. Over real HTTP, against a real `lamina serve`."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lamina.home import Home
from lamina.layer.importer import load_tree
from lamina.layer.tree import Entry, Kind, Tree
from lamina.store import codec
from tests.conftest import Cli, write_sparse
from tests.servers import Server
from tests.trees import write_tree


@dataclass
class Fleet:
    server: Server
    machine: httpx.Client
    admin: httpx.Client
    secret: bytes  # a chunk of a layer m1 is not entitled to
    app: bytes  # a chunk of a layer entitled to m1


def _chunk_of(home: Home, manifest: str) -> bytes:
    return next(iter(load_tree(home.store, bytes.fromhex(manifest)).referenced()))


@pytest.fixture
def fleet(cli: Cli, home: Home, server: Server, tmp_path: Path) -> Iterator[Fleet]:
    cli("image", "import", "base", str(write_sparse(tmp_path / "d.raw", 1 << 20, [])))
    token = cli.json("machine", "add", "m1", "--image", "base")["token"]
    cli("user", "add", "alice")
    secret = cli.json(
        "layer", "import", "secret", str(write_tree(tmp_path / "s", {"keys": os.urandom(9000)}))
    )["manifest"]
    app = cli.json(
        "layer", "import", "app", str(write_tree(tmp_path / "a", {"bin/app": os.urandom(9000)}))
    )["manifest"]
    cli("entitle", "app", "--machine", "m1")
    admin = cli("admin", "token").out.strip()
    server.start()
    api = f"{server.http_url}/api/v1"
    with (
        httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}) as machine,
        httpx.Client(base_url=api, headers={"Authorization": f"Bearer {admin}"}) as admin_client,
    ):
        yield Fleet(server, machine, admin_client, _chunk_of(home, secret), _chunk_of(home, app))


def _upload(client: httpx.Client, *blobs: bytes) -> list[bytes]:
    body = b""
    ids = []
    for data in blobs:
        cid = codec.chunk_id(data)
        envelope = codec.encode(data)
        body += cid + struct.pack(">I", len(envelope)) + envelope
        ids.append(cid)
    r = client.post("/chunks", content=body, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    return ids


def _manifest(*chunks: tuple[bytes, int]) -> bytes:
    files = [
        Entry(f"home/alice/f{i}", Kind.FILE, size=n, chunks=((cid, n),))
        for i, (cid, n) in enumerate(chunks)
    ]
    dirs = [Entry("", Kind.DIR, 0o755), Entry("home", Kind.DIR, 0o755)]
    dirs.append(Entry("home/alice", Kind.DIR, 0o755))
    return Tree.of([*dirs, *files]).to_bytes()


def _logout(client: httpx.Client, manifest: bytes, files: int) -> httpx.Response:
    writable = {"manifest": codec.chunk_id(manifest).hex(), "files": files, "size": 9000}
    return client.post("/agent/logout", json={"user": "alice", "writable": writable})


def test_a_forged_writable_layer_does_not_open_a_chunk(fleet: Fleet) -> None:
    """Log in, log out with a manifest naming a chunk of a layer the machine may not read,
    log in again: the chunk stays closed (without the check it was served from then on)."""
    m = fleet.machine
    assert m.post("/agent/login", json={"user": "alice"}).status_code == 200
    assert m.get(f"/chunks/{fleet.secret.hex()}").status_code == 403
    forged = _manifest((fleet.secret, 9000))
    _upload(m, forged)  # the manifest itself is the machine's: uploaded
    refused = _logout(m, forged, 1)
    assert refused.status_code == 403, refused.text
    assert "neither uploaded nor may read" in refused.json()["detail"]
    assert m.post("/agent/login", json={"user": "alice"}).status_code == 200
    assert m.get(f"/chunks/{fleet.secret.hex()}").status_code == 403
    # a version of what it uploaded and of what it may read is saved, and kept readable
    mine = os.urandom(9000)
    (cid,) = _upload(m, mine)
    good = _manifest((cid, 9000), (fleet.app, 9000))
    _upload(m, good)
    saved = _logout(m, good, 2)
    assert saved.status_code == 200 and saved.json()["saved"] == "writable-alice@1", saved.text
    assert m.post("/agent/login", json={"user": "alice"}).status_code == 200
    assert m.get(f"/chunks/{cid.hex()}").status_code == 200


def test_an_entitlement_taken_back_closes_its_chunks_on_the_next_request(
    fleet: Fleet, cli: Cli
) -> None:
    m = fleet.machine
    assert m.get(f"/chunks/{fleet.app.hex()}").status_code == 200
    cli("unentitle", "app", "--machine", "m1")
    assert m.get(f"/chunks/{fleet.app.hex()}").status_code == 403


def test_missing_answers_only_for_chunks_the_caller_may_read(fleet: Fleet) -> None:
    nowhere = os.urandom(32)
    ids = [fleet.secret.hex(), fleet.app.hex(), nowhere.hex()]
    as_machine = fleet.machine.post("/chunks/missing", json={"ids": ids}).json()["ids"]
    assert as_machine == [fleet.secret.hex(), nowhere.hex()]  # the secret looks absent
    assert fleet.admin.post("/chunks/missing", json={"ids": ids}).json()["ids"] == [nowhere.hex()]
    # once the machine sent the data, it has shown it holds it
    data = os.urandom(5000)
    (cid,) = _upload(fleet.machine, data)
    again = fleet.machine.post("/chunks/missing", json={"ids": [cid.hex()]}).json()["ids"]
    assert again == []
