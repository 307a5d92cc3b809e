"""No routine operation loses a machine's or a user's data without asking: the
administrator's steps that lost data silently, run as an administrator would (the real
CLI, a real `lamina serve`, machines writing over NBD, agents logging in over HTTP).

- a user's writable layer: removing it (while its user is away, or logged in), and an
  entitled app layer's entitlements;
- a stateful machine's delta: re-pinning, resetting (the CLI, and the console's button);
- duplicates: a MAC or hostname taken twice; an empty commit, an identical import.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lamina.delta.file import delta_usage
from tests.conftest import Cli, write_sparse
from tests.console.conftest import login_url
from tests.nbdtools import ok, qemu_io
from tests.servers import Server

MiB = 1 << 20
REFUSED_UNCONFIRMED = 13
_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


@dataclass
class Site:
    cli: Cli
    server: Server
    tokens: dict[str, str]
    disk: Path

    def agent(self, machine: str) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.server.http_url}/api/v1",
            headers={"Authorization": f"Bearer {self.tokens[machine]}"},
            timeout=60,
        )


@pytest.fixture
def site(cli: Cli, server: Server, tmp_path: Path) -> Iterator[Site]:
    """golden@1 and golden@2; machines sf (stateful) and desk; an app layer "office"
    entitled to group staff; users alice (in staff) and bob."""
    disk = write_sparse(tmp_path / "golden.raw", 8 * MiB, [(0, b"golden-1" * 4096)])
    cli("image", "import", "golden", str(disk))
    disk.write_bytes(disk.read_bytes().replace(b"golden-1", b"golden-2"))
    cli("image", "import", "golden", str(disk))
    tokens = {
        "sf": cli.json("machine", "add", "sf", "--image", "golden@1", "--mode", "stateful")[
            "token"
        ],
        "desk": cli.json("machine", "add", "desk", "--image", "golden")["token"],
    }
    app = tmp_path / "office" / "opt" / "office"
    app.mkdir(parents=True)
    (app / "README").write_text("office\n")
    cli("layer", "import", "office", str(app.parent.parent))
    cli("group", "add", "staff")
    cli("user", "add", "alice", "--group", "staff")
    cli("user", "add", "bob")
    cli("entitle", "office", "--group", "staff")
    server.start()
    yield Site(cli, server, tokens, disk)


def _save_writable(site: Site, user: str, machine: str, text: bytes) -> str:
    """Log ``user`` in on ``machine`` and out again, saving a writable version that holds
    one file (its chunks uploaded first, as the agent does); returns NAME@V."""
    from lamina.layer.tree import Entry, Kind, Tree
    from lamina.store import codec

    cid = codec.chunk_id(text)
    tree = Tree.of(
        [
            Entry("", Kind.DIR, 0o755),
            Entry("notes", Kind.FILE, 0o644, size=len(text), chunks=((cid, len(text)),)),
        ]
    )
    manifest = tree.to_bytes()
    mid = codec.chunk_id(manifest)
    body = b"".join(
        c + len(env).to_bytes(4, "big") + env
        for c, env in ((cid, codec.encode(text)), (mid, codec.encode(manifest)))
    )
    with site.agent(machine) as agent:
        assert agent.post("/agent/login", json={"user": user}).status_code == 200
        agent.post("/chunks", content=body, headers={"Content-Type": "application/octet-stream"})
        saved = {"manifest": mid.hex(), "files": 1, "size": len(text)}
        out = agent.post("/agent/logout", json={"user": user, "writable": saved}).json()
    assert out["ended"], out
    return str(out["saved"])


def _refused(result: object, *words: str) -> None:
    code, err = result.code, result.err  # type: ignore[attr-defined]
    assert code == REFUSED_UNCONFIRMED and len(err.splitlines()) == 1, (code, err)
    for word in words:
        assert word in err, (word, err)


# -- a user's writable layer, an entitled app layer --------------------------------------------


def test_a_writable_layer_with_saved_files_goes_only_when_confirmed(site: Site) -> None:
    cli = site.cli
    assert _save_writable(site, "bob", "desk", b"one") == "writable-bob@1"
    assert _save_writable(site, "bob", "desk", b"two") == "writable-bob@2"
    refused = cli("layer", "rm", "writable-bob", check=False)
    _refused(refused, "bob's saved files", "writable-bob@1, writable-bob@2")
    assert [v["ref"] for v in cli.json("layer", "log", "writable-bob")] == [
        "writable-bob@1",
        "writable-bob@2",
    ]
    assert cli.json("layer", "rm", "writable-bob", "--force")["removed"] == [
        "writable-bob@1",
        "writable-bob@2",
    ]
    # bob is still a user with a writable layer: his next session starts empty and saves
    with site.agent("desk") as agent:
        state = agent.post("/agent/login", json={"user": "bob"}).json()
        assert state["writable"] == {
            "name": "writable-bob",
            "version": None,
            "manifest": None,
            "policy": "all",
        }
        agent.post("/agent/logout", json={"user": "bob"})
    assert _save_writable(site, "bob", "desk", b"three") == "writable-bob@3"


def test_a_writable_layer_in_a_session_is_not_removed_even_forced(site: Site) -> None:
    with site.agent("desk") as agent:
        assert agent.post("/agent/login", json={"user": "alice"}).status_code == 200
        refused = site.cli("layer", "rm", "writable-alice", "--force", check=False)
        assert refused.code == 9
        assert "writable-alice is in use by alice's session on desk: log alice out" in refused.err
        ended = agent.post("/agent/logout", json={"user": "alice"}).json()
    assert ended == {"user": "alice", "ended": True, "saved": None}


def test_an_entitled_layer_says_who_loses_it(site: Site) -> None:
    cli = site.cli
    cli("entitle", "office", "--user", "bob")
    refused = cli("layer", "rm", "office", check=False)
    _refused(refused, "office is entitled to group staff, user bob")
    assert len(cli.json("layer", "log", "office")) == 1
    with site.agent("desk") as agent:  # alice still gets it
        layers = agent.post("/agent/login", json={"user": "alice"}).json()["layers"]
        assert [la["ref"] for la in layers] == ["office@1"]
        agent.post("/agent/logout", json={"user": "alice"})
    assert cli.json("layer", "rm", "office", "--force")["removed"] == ["office@1"]
    with site.agent("desk") as agent:
        assert agent.post("/agent/login", json={"user": "alice"}).json()["layers"] == []


# -- a stateful machine's delta ---------------------------------------------------------------


def test_re_pinning_or_resetting_a_stateful_delta_asks_first(site: Site) -> None:
    cli = site.cli
    ok(qemu_io(site.server.url("machine/sf"), f"write -P 0x5a 0 {MiB}", "flush"))
    refused = cli("machine", "set", "sf", "--image", "golden@2", check=False)
    _refused(refused, "sf is stateful and its delta holds 1.0 MiB", "re-pinning it to golden@2")
    assert cli.json("machine", "show", "sf")["image"] == "golden@1"
    _refused(cli("machine", "reset", "sf", check=False), "holds 1.0 MiB that a reset")
    _refused(cli("machine", "set", "sf", "--mode", "stateless", check=False), "stateless")
    _refused(cli("machine", "rm", "sf", check=False), "that removing it would discard")
    # everything is still there: the disk reads what the machine wrote
    ok(qemu_io(site.server.url("machine/sf"), f"read -P 0x5a 0 {MiB}", read_only=True))
    shown = cli.json("machine", "set", "sf", "--image", "golden@2", "--force")
    assert shown["image"] == "golden@2" and shown["delta_bytes"] == 0


def test_the_console_reset_of_an_offline_stateful_machine_confirms(site: Site) -> None:
    ok(qemu_io(site.server.url("machine/sf"), "write -P 0x5a 0 64k", "flush"))
    deltas = site.cli.home / "deltas" / "sf"
    with httpx.Client(base_url=site.server.http_url) as console:
        assert console.get(login_url(site.server)).status_code == 303
        found = _CSRF.search(console.get("/machines").text)
        assert found is not None
        csrf = found.group(1)
        asked = console.post("/machines/sf/reset", data={"csrf": csrf, "next": "/machines"})
        assert asked.status_code == 200 and "Confirm: Reset sf" in asked.text
        assert "its delta holds 64.0 KiB that a reset would discard" in asked.text
        assert delta_usage(deltas)[0] == 16  # nothing went
        # the confirmation repeats the form with confirm=1
        form = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', asked.text))
        assert form == {"csrf": csrf, "next": "/machines", "confirm": "1"}
        done = console.post("/machines/sf/reset", data=form)
        assert done.status_code == 303
        assert "sf: delta discarded (64.0 KiB)" in console.get("/machines").text
    assert delta_usage(deltas) == (0, 0)


# -- duplicates -------------------------------------------------------------------------------


def test_a_mac_or_hostname_belongs_to_one_machine(site: Site) -> None:
    cli = site.cli
    mac = cli.json("machine", "show", "desk")["mac"]
    taken = cli("machine", "add", "m3", "--image", "golden", "--mac", mac.upper(), check=False)
    assert taken.code == 4 and f"MAC address {mac} belongs to machine desk" in taken.err
    taken = cli("machine", "add", "m3", "--image", "golden", "--hostname", "Desk", check=False)
    assert taken.code == 4 and "hostname desk belongs to machine desk" in taken.err
    cli("machine", "add", "m3", "--image", "golden", "--hostname", "desk", "--domain", "lab")
    assert cli("machine", "set", "sf", "--mac", mac, check=False).code == 4
    taken = cli("machine", "set", "sf", "--hostname", "desk", "--domain", "lab", check=False)
    assert taken.code == 4 and "hostname desk.lab belongs to machine m3" in taken.err
    assert [m["name"] for m in cli.json("machine", "list")] == ["desk", "m3", "sf"]
    assert cli.json("machine", "show", "sf")["fqdn"] == "sf"


def test_an_empty_commit_or_an_identical_import_makes_no_new_version(
    site: Site, tmp_path: Path
) -> None:
    cli = site.cli
    assert cli("delta", "commit", "sf").out.strip() == "unchanged, golden@1"
    assert cli("image", "import", "golden", str(site.disk)).out.strip() == "unchanged, golden@2"
    assert [v["ref"] for v in cli.json("image", "log", "golden")] == ["golden@1", "golden@2"]
    app = tmp_path / "office" / "opt" / "office"  # the tree "office@1" was imported from
    assert cli("layer", "import", "office", str(app.parent.parent)).out.strip() == (
        "unchanged, office@1"
    )
    (app / "README").write_text("office 2\n")
    assert cli("layer", "import", "office", str(app.parent.parent)).out.strip() == "office@2"
    # a delta that changes something still makes a new version
    ok(qemu_io(site.server.url("machine/sf"), "write -P 0x77 0 64k", "flush"))
    assert cli("delta", "commit", "sf").out.strip() == "golden@3"
