"""The agent end to end: a real manager, real agents, real overlayfs mounts.

Login mounts the entitled layers and the writable layer; an entitlement made while the
user is logged in appears live (within 2 s), one taken back disappears; the manager
refuses the user's login on a second machine while the first holds the writable layer;
logout keeps the user's files in a new writable version, which a login on the other
machine sees; the agent rides out a manager restart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.agent.agents import AgentProc
from tests.conftest import Cli, write_sparse
from tests.servers import Server, wait_for
from tests.trees import needs_root, write_tree

pytestmark = [pytest.mark.peers, needs_root]


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.stop()


def setup_fleet(cli: Cli, tmp_path: Path) -> list[str]:
    """Two machines with the os layer, alice in staff, staff entitled to app1."""
    cli("image", "import", "base", str(write_sparse(tmp_path / "d.raw", 1 << 20, [])))
    tokens = [cli.json("machine", "add", m, "--image", "base")["token"] for m in ("m1", "m2")]
    src = tmp_path / "src"
    os_files = {"etc/os-release": "lamina\n", "home/.keep": ""}
    cli("layer", "import", "os", str(write_tree(src / "os", os_files)))
    cli("layer", "import", "app1", str(write_tree(src / "app1", {"opt/app1/run": "one\n"})))
    cli("layer", "import", "app2", str(write_tree(src / "app2", {"opt/app2/run": "two\n"})))
    cli("group", "add", "staff")
    cli("user", "add", "alice", "--group", "staff", "--policy", "profile")
    cli("entitle", "os", "--machine", "m1")
    cli("entitle", "os", "--machine", "m2")
    cli("entitle", "app1", "--group", "staff")
    return tokens


def live_entitlements(http: httpx.Client, alice: Path) -> None:
    """An entitlement made while alice is logged in appears within 2 s; one taken back
    goes within 2 s."""
    # a new entitlement appears live, within 2 s
    assert http.post("/entitlements", json={"layer": "app2", "user": "alice"}).status_code == 201
    took = wait_for((alice / "opt/app2/run").exists, 2.0)
    assert (alice / "opt/app2/run").read_text() == "two\n", took
    # and one taken back goes
    assert http.request(
        "DELETE", "/entitlements", params={"layer": "app1", "group": "staff"}
    ).json() == {"layer": "app1", "kind": "group", "target": "staff", "removed": 1}
    wait_for(lambda: not (alice / "opt/app1").exists(), 2.0)
    assert (alice / "opt/app2/run").exists()


def test_login_live_entitlements_logout_and_roaming(
    cli: Cli, server: Server, tmp_path: Path, agents: list[AgentProc]
) -> None:
    tokens = setup_fleet(cli, tmp_path)
    admin = cli("admin", "token").out.strip()
    server.start()
    url = server.http_url
    a1 = AgentProc(tmp_path / "a1", url, tokens[0]).start()
    a2 = AgentProc(tmp_path / "a2", url, tokens[1]).start()
    agents += [a1, a2]

    # boot applied the identity
    assert (a1.etc / "hostname").read_text() == "m1\n"
    assert len((a1.etc / "machine-id").read_text().strip()) == 32
    assert (a1.etc / "ssh" / "ssh_host_ed25519_key.pub").read_text().startswith("ssh-ed25519 ")

    a1.run("login", "alice")
    alice = a1.root / "alice"
    assert (alice / "opt/app1/run").read_text() == "one\n"
    assert (alice / "etc/os-release").read_text() == "lamina\n"
    assert not (alice / "opt/app2").exists()

    http = httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {admin}"})
    live_entitlements(http, alice)

    (alice / "home/alice").mkdir(parents=True)
    (alice / "home/alice/notes.txt").write_text("remember\n")
    (alice / "opt/scratch").write_text("dropped by the profile policy\n")

    # the writable layer is in use on m1: m2 may not have it
    refused = a2.run("login", "alice", check=False)
    assert refused.returncode == 9 and "in use on m1" in refused.stderr
    sessions = http.get("/sessions", params={"user": "alice"}).json()
    assert [s["machine"] for s in sessions["items"]] == ["m1"]

    # the manager goes away and comes back: the agent follows entitlements again
    server.stop()
    server.start()
    assert http.post("/entitlements", json={"layer": "app1", "user": "alice"}).status_code == 201
    wait_for((alice / "opt/app1/run").exists, 12.0)

    # logout while the manager is down: unmounted at once, handed over when it is back
    server.stop()
    outcome: list[str] = []
    logout = threading.Thread(
        target=lambda: outcome.append(a1.run("logout", "alice", "--json").stdout)
    )
    logout.start()
    wait_for(lambda: not (alice / "opt").exists(), 10.0)
    server.start()
    logout.join(60)
    out = outcome[0]
    assert '"saved": "writable-alice@1"' in out
    assert not (alice / "opt").exists()  # unmounted
    user = http.get("/users/alice").json()
    assert user["writable_version"] == 1 and user["in_use_on"] is None

    # roaming: m2 now gets alice's writable layer with her notes
    a2.run("login", "alice")
    roamed = a2.root / "alice"
    assert (roamed / "home/alice/notes.txt").read_text() == "remember\n"
    assert not (roamed / "opt/scratch").exists()
    assert (roamed / "opt/app2/run").read_text() == "two\n"
    assert "writable-alice" in http.get("/sessions").json()["items"][0]["writable"]
    a2.run("logout", "alice")
    assert http.get("/sessions").json()["total"] == 0
