"""The admin and agent APIs over real HTTP (lamina serve on loopback), on SQLite and on
PostgreSQL: paging and filters, errors, the CLI through --manager, logins that conflict,
racing logins, long-polls woken by entitlement changes, writable versions at logout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lamina.home import Home
from lamina.manager.layer_records import DatabaseRecords
from tests.conftest import Cli, write_sparse
from tests.servers import Server


@dataclass
class Fleet:
    url: str
    admin: httpx.Client
    tokens: dict[str, str]

    def agent(self, machine: str) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.url}/api/v1",
            headers={"Authorization": f"Bearer {self.tokens[machine]}"},
            timeout=60,
        )


def make_fleet(home: Home, tmp_path: Path) -> dict[str, str]:
    """Machines m0..m3 on an image, layers os/app1/app2, users alice and bob, alice in
    staff, staff entitled to app1 and (as its base) os. Returns the machine tokens."""
    from lamina.layer.importer import import_layer
    from lamina.manager.services import access, images, machines

    disk = write_sparse(tmp_path / "d.raw", 1 << 20, [])
    images.import_image(store=home.store, session=home.session, name="base", path=disk)
    for name in ("os", "app1", "app2"):
        src = tmp_path / "src" / name / "opt" / name
        src.mkdir(parents=True)
        (src / "file").write_text(name)
        import_layer(home, DatabaseRecords(home), name, src.parent.parent)
    with home.session() as s:
        tokens = {m: machines.add(s, name=m, image="base").token for m in ("m0", "m1", "m2", "m3")}
        access.add_group(s, name="staff")
        access.add_user(s, name="alice", groups=["staff"])
        access.add_user(s, name="bob")
        staff = access.target(s, group="staff")
        access.entitle(s, layer="os", to=staff, priority=1000)
        access.entitle(s, layer="app1", to=staff)
    return tokens


@pytest.fixture
def fleet(database: str, home: Home, server: Server, tmp_path: Path) -> Iterator[Fleet]:
    from lamina.manager.services import settings

    tokens = make_fleet(home, tmp_path)
    with home.session() as s:
        admin = settings.admin_token(s)
    server.start()
    url = server.http_url
    client = httpx.Client(
        base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {admin}"}, timeout=60
    )
    yield Fleet(url, client, tokens)
    client.close()


def test_admin_lists_page_and_filter(fleet: Fleet) -> None:
    for i in range(23):
        r = fleet.admin.post("/users", json={"name": f"u{i:02d}", "groups": ["staff"]})
        assert r.status_code == 201, r.text
    page = fleet.admin.get("/users", params={"offset": 20, "limit": 10}).json()
    assert page["total"] == 25 and len(page["items"]) == 5
    # sorted by name: alice, bob, u00 ... u22, so offset 20 starts at u18
    assert [u["name"] for u in page["items"]] == ["u18", "u19", "u20", "u21", "u22"]
    names = [
        u["name"]
        for u in fleet.admin.get("/users", params={"q": "u1", "limit": 100}).json()["items"]
    ]
    assert names == [f"u1{i}" for i in range(10)]
    staff = fleet.admin.get("/users", params={"group": "staff", "limit": 1}).json()
    assert staff["total"] == 24 and len(staff["items"]) == 1
    ents = fleet.admin.get("/entitlements", params={"group": "staff"}).json()
    assert sorted((e["layer"], e["priority"]) for e in ents["items"]) == [
        ("app1", 100),
        ("os", 1000),
    ]
    machines = fleet.admin.get("/machines", params={"q": "m", "limit": 2}).json()
    assert machines["total"] == 4 and [m["name"] for m in machines["items"]] == ["m0", "m1"]
    with fleet.agent("m2") as agent:
        assert agent.post("/agent/login", json={"user": "bob"}).status_code == 200
    in_use = fleet.admin.get("/machines", params={"state": "in-use"}).json()
    assert [m["name"] for m in in_use["items"]] == ["m2"]
    new = fleet.admin.get("/machines", params={"state": "new", "mode": "stateless"}).json()
    assert new["total"] == 4  # logged in, never booted
    assert fleet.admin.get("/machines", params={"mode": "stateful"}).json()["total"] == 0
    assert fleet.admin.get("/machines", params={"state": "gone"}).status_code == 422
    layers = fleet.admin.get("/layers", params={"kind": "app"}).json()
    assert [la["name"] for la in layers["items"]] == ["app1", "app2", "os"]
    assert fleet.admin.get("/images").json()["items"][0]["versions"][0]["machines"] == 4


def test_admin_errors(fleet: Fleet) -> None:
    bare = httpx.Client(base_url=f"{fleet.url}/api/v1")
    assert bare.get("/users").status_code == 401
    with fleet.agent("m0") as agent:
        assert agent.get("/users").status_code == 403
    assert fleet.admin.post("/users", json={"name": "alice"}).status_code == 409
    assert fleet.admin.post("/users", json={"name": "../etc"}).status_code == 422
    assert fleet.admin.post("/users", json={"name": "x", "groups": ["nope"]}).status_code == 404
    assert fleet.admin.get("/users/nobody").status_code == 404
    both = {"layer": "app1", "user": "bob", "group": "staff"}
    assert fleet.admin.post("/entitlements", json=both).status_code == 422
    assert (
        fleet.admin.post("/entitlements", json={"layer": "nope", "user": "bob"}).status_code == 404
    )
    writable = {"layer": "writable-bob", "user": "bob"}
    assert fleet.admin.post("/entitlements", json=writable).status_code == 422
    assert fleet.admin.delete("/images/base").status_code == 409  # machines are pinned to it


def test_cli_through_the_manager(fleet: Fleet, cli: Cli) -> None:
    token = fleet.admin.headers["authorization"].split()[1]
    remote = ("--manager", fleet.url, "--token", token)
    cli("group", "add", "devs", *remote)
    cli("user", "add", "carol", "--group", "devs", "--policy", "apps", *remote)
    cli("entitle", "app2", "--group", "devs", *remote)
    # the embedded database under --home sees the same
    users = {u["name"]: u for u in cli.json("user", "list")}
    assert users["carol"]["groups"] == ["devs"] and users["carol"]["policy"] == "apps"
    again = cli("entitle", "app2", "--group", "devs", *remote, check=False)
    assert again.code == 4 and "already" in again.err
    cli("unentitle", "app2", "--group", "devs")
    assert cli.json("user", "list", *remote)[1]["name"] == "bob"
    gone = cli("unentitle", "app2", "--group", "devs", *remote, check=False)
    assert gone.code == 3


INVALID_NAMES = ["", "../x", "a b", "x" * 65, "é", "-x", ".x", "a/b", "a\x00b", None, 123, ["a"]]


def test_login_refuses_invalid_user_names(fleet: Fleet) -> None:
    with fleet.agent("m0") as agent:
        for name in INVALID_NAMES:
            r = agent.post("/agent/login", json={"user": name})
            assert 400 <= r.status_code < 500, (name, r.text)
            assert agent.post("/agent/logout", json={"user": name}).status_code in (404, 422)
        assert agent.post("/agent/login", content=b"{not json").status_code == 422
    assert fleet.admin.get("/sessions").json()["total"] == 0


def test_login_conflict_relogin_and_roaming(fleet: Fleet) -> None:
    m0, m1 = fleet.agent("m0"), fleet.agent("m1")
    boot = m0.post("/agent/boot").json()
    assert (
        boot["machine"] == "m0"
        and boot["image"] == "base@1"
        and boot["identity"]["hostname"] == "m0"
    )
    first = m0.post("/agent/login", json={"user": "alice"})
    assert first.status_code == 200
    state = first.json()
    assert [la["ref"] for la in state["layers"]] == ["app1@1", "os@1"]  # os last: the base
    assert state["writable"] == {
        "name": "writable-alice",
        "version": None,
        "manifest": None,
        "policy": "all",
    }
    assert m0.post("/agent/login", json={"user": "alice"}).json() == state  # idempotent
    busy = m1.post("/agent/login", json={"user": "alice"})
    assert busy.status_code == 409 and "in use on m0" in busy.json()["detail"]
    assert m1.post("/agent/login", json={"user": "nobody"}).status_code == 404
    user = fleet.admin.get("/users/alice").json()
    assert user["in_use_on"] == "m0"
    assert m0.post("/agent/logout", json={"user": "alice"}).json()["ended"] is True
    assert m0.post("/agent/logout", json={"user": "alice"}).json()["ended"] is False
    assert m1.post("/agent/login", json={"user": "alice"}).status_code == 200
    # bob has no entitlements but may log in (his session has no layers)
    assert m1.post("/agent/login", json={"user": "bob"}).json()["layers"] == []


def test_racing_logins_leave_one_holder(fleet: Fleet) -> None:
    clients = [fleet.agent(m) for m in ("m0", "m1", "m2", "m3")]
    for _round in range(5):
        barrier = threading.Barrier(len(clients))

        def login(c: httpx.Client, barrier: threading.Barrier = barrier) -> int:
            barrier.wait()
            return c.post("/agent/login", json={"user": "alice"}).status_code

        with ThreadPoolExecutor(len(clients)) as pool:
            codes = sorted(pool.map(login, clients))
        assert codes == [200, 409, 409, 409]
        sessions = fleet.admin.get("/sessions", params={"user": "alice"}).json()
        assert sessions["total"] == 1
        holder = sessions["items"][0]["machine"]
        # racing logouts from everyone, and an entitlement change: only the holder ends it
        with ThreadPoolExecutor(len(clients) + 1) as pool:
            ended = list(
                pool.map(
                    lambda c: c.post("/agent/logout", json={"user": "alice"}).json()["ended"],
                    clients,
                )
            )
            pool.submit(
                fleet.admin.post, "/entitlements", json={"layer": "app2", "user": "alice"}
            ).result()
        assert ended.count(True) == 1, (holder, ended)
        assert fleet.admin.get("/sessions").json()["total"] == 0
        fleet.admin.request("DELETE", "/entitlements", params={"layer": "app2", "user": "alice"})


def test_long_poll_wakes_on_entitlement_change(fleet: Fleet) -> None:
    m0 = fleet.agent("m0")
    m0.post("/agent/login", json={"user": "alice"})
    first = m0.get("/agent/desired").json()
    assert [la["ref"] for la in first["sessions"][0]["layers"]] == ["app1@1", "os@1"]
    started = time.monotonic()
    same = m0.get("/agent/desired", params={"wait": 1, "rev": first["rev"]})
    assert same.json()["rev"] == first["rev"] and time.monotonic() - started >= 0.9
    timer = threading.Timer(
        0.5, lambda: fleet.admin.post("/entitlements", json={"layer": "app2", "user": "alice"})
    )
    timer.start()
    started = time.monotonic()
    changed = m0.get(
        "/agent/desired", params={"wait": 20}, headers={"If-None-Match": f'"{first["rev"]}"'}
    ).json()
    took = time.monotonic() - started
    timer.join()
    assert changed["rev"] != first["rev"] and took < 2.0
    assert [la["ref"] for la in changed["sessions"][0]["layers"]] == ["app2@1", "app1@1", "os@1"]


def test_logout_records_the_writable_version(fleet: Fleet, tmp_path: Path) -> None:
    from lamina.layer.tree import Entry, Kind, Tree
    from lamina.store import codec

    data = b"alice's notes\n"
    cid = codec.chunk_id(data)
    tree = Tree.of(
        [
            Entry("", Kind.DIR, 0o755),
            Entry("notes", Kind.FILE, 0o644, size=len(data), chunks=((cid, len(data)),)),
        ]
    )
    manifest = tree.to_bytes()
    mid = codec.chunk_id(manifest)
    m0, m1 = fleet.agent("m0"), fleet.agent("m1")
    m0.post("/agent/login", json={"user": "alice"})
    saved = {"manifest": mid.hex(), "files": 1, "size": len(data), "bases": ["app1@1", "os@1"]}
    # the data is not there yet: refused, and the session stays
    r = m0.post("/agent/logout", json={"user": "alice", "writable": saved})
    assert r.status_code == 422 and fleet.admin.get("/sessions").json()["total"] == 1
    missing = m0.post("/chunks/missing", json={"ids": [cid.hex(), mid.hex()]}).json()["ids"]
    assert missing == [cid.hex(), mid.hex()]
    body = b"".join(
        cid_ + len(env).to_bytes(4, "big") + env
        for cid_, env in ((cid, codec.encode(data)), (mid, codec.encode(manifest)))
    )
    bad = bytearray(body)
    bad[-1] ^= 1
    headers = {"Content-Type": "application/octet-stream"}
    assert m0.post("/chunks", content=bytes(bad), headers=headers).status_code == 422
    assert m0.post("/chunks", content=body, headers=headers).json()["stored"] == 2
    out = m0.post("/agent/logout", json={"user": "alice", "writable": saved}).json()
    assert out == {"user": "alice", "ended": True, "saved": "writable-alice@1"}
    # a retried logout (its answer lost) answers the same, and records nothing twice
    again = m0.post("/agent/logout", json={"user": "alice", "writable": saved}).json()
    assert again["saved"] == "writable-alice@1"
    layer = next(
        la
        for la in fleet.admin.get("/layers", params={"kind": "writable"}).json()["items"]
        if la["name"] == "writable-alice"
    )
    assert [v["ref"] for v in layer["versions"]] == ["writable-alice@1"]
    # the next login, anywhere, continues from it; its data is readable there, not elsewhere
    state = m1.post("/agent/login", json={"user": "alice"}).json()
    assert state["writable"]["version"] == 1 and state["writable"]["manifest"] == mid.hex()
    assert m1.get(f"/chunks/{cid.hex()}").status_code == 200
    assert m1.get(f"/chunks/{mid.hex()}").status_code == 200
    with fleet.agent("m2") as m2:
        assert m2.get(f"/chunks/{cid.hex()}").status_code == 403
