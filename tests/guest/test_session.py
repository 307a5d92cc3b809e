"""The agent's system mode on this host: a user's layers appear in a running system.

A directory plays the machine's root (its ``usr``, ``opt``, ``etc`` and ``home``); the
agent runs with ``--system-root`` on it, against a real manager, with real overlay and
bind mounts. The base layer is entitled to the machine but never fetched: the system is
the base. What a logged-in user sees is what a shell started before a change sees.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.agent.agents import AgentProc
from tests.conftest import Cli, write_sparse
from tests.servers import Server, wait_for
from tests.trees import needs_root, write_tree

pytestmark = [pytest.mark.peers, needs_root]

SYSTEM = {
    "usr/bin/tool": "#!/bin/sh\necho system tool\n",
    "etc/os-release": "ID=test\n",
    "opt": None,
    "home/alice/.profile": "# alice\n",
    "home/bob": None,
}


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.stop()


class Shell:
    """A shell started before the change, in the system root's home of the user: the
    'existing shell' of a user who stays logged in."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            ["sh"], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{command} 2>&1; echo '--end--'\n")
        self.proc.stdin.flush()
        lines = []
        while (line := self.proc.stdout.readline()) != "--end--\n":
            lines.append(line)
        return "".join(lines)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def fleet(cli: Cli, tmp_path: Path) -> list[str]:
    cli("image", "import", "img", str(write_sparse(tmp_path / "d.raw", 1 << 20, [])))
    tokens = [cli.json("machine", "add", m, "--image", "img")["token"] for m in ("m1", "m2")]
    src = tmp_path / "src"
    cli("layer", "import", "os", str(write_tree(src / "os", SYSTEM)))
    app1 = {"usr/bin/app1": "#!/bin/sh\necho app one\n", "opt/app1/data": "1\n"}
    app2 = {"usr/bin/app2": "#!/bin/sh\necho app two\n", "etc/app2.conf": "two=2\n"}
    for app, files in (("app1", app1), ("app2", app2)):
        (write_tree(src / app, files) / "usr/bin" / app).chmod(0o755)
        cli("layer", "import", app, str(src / app))
    cli("user", "add", "alice", "--policy", "profile")
    cli("user", "add", "bob", "--policy", "profile")
    for m in ("m1", "m2"):
        cli("entitle", "os", "--machine", m)
    cli("entitle", "app1", "--user", "alice")
    return tokens


def system_agent(tmp_path: Path, name: str, url: str, token: str) -> tuple[AgentProc, Path]:
    system = write_tree(tmp_path / name / "system", SYSTEM)
    (system / "usr/bin/tool").chmod(0o755)
    agent = AgentProc(tmp_path / name, url, token, "--system-root", str(system))
    return agent.start(), system


def alice_on_m1(a1: AgentProc, sys1: Path, http: httpx.Client) -> None:
    """Login, a live entitlement seen by her existing shell, a file in her home, a second
    PAM session of hers, bob refused meanwhile, logout."""
    started = time.monotonic()
    a1.run("login", "alice")
    print(f"login to composed session: {time.monotonic() - started:.2f} s")
    shell = Shell(sys1 / "home/alice")
    try:
        # the app is in the system's /usr and /opt, the system's own files are still there
        assert shell.run(f"{sys1}/usr/bin/app1") == "app one\n"
        assert (sys1 / "opt/app1/data").read_text() == "1\n"
        assert shell.run(f"{sys1}/usr/bin/tool") == "system tool\n"
        assert shell.run("cat .profile") == "# alice\n"
        # the base layer was never fetched: the system stands in for it
        assert len(list((a1.home / "cache" / "layers").glob("*.erofs"))) == 1

        # entitled while logged in: the existing shell runs it within 2 s
        created = http.post("/entitlements", json={"layer": "app2", "user": "alice"})
        assert created.status_code == 201
        took = wait_for((sys1 / "usr/bin/app2").exists, 2.0)
        print(f"entitlement to visible: {took:.2f} s")
        # the agent's log says where its part went
        wait_for(lambda: "attach alice app2@1 (fetch " in a1.logs(), 5.0)
        assert re.search(
            r"fetch [\d.]+ s, image [\d.]+ s, mount [\d.]+ s, show [\d.]+ s", a1.logs()
        )
        assert shell.run(f"{sys1}/usr/bin/app2") == "app two\n"
        assert (sys1 / "etc/app2.conf").read_text() == "two=2\n"
        assert shell.run(f"{sys1}/usr/bin/app1") == "app one\n"
        assert shell.run("pwd").strip() == str(sys1 / "home/alice")

        shell.run("echo remember > notes.txt")
        assert (sys1 / "home/alice/notes.txt").read_text() == "remember\n"
        # a second PAM session of hers, ended: the composition stays for the first
        a1.run("login", "alice")
        a1.run("logout", "alice")
        assert (sys1 / "usr/bin/app2").exists()
        # bob, while alice holds the machine: refused with a reason, nothing changes
        refused = a1.run("login", "bob", check=False)
        assert refused.returncode == 9 and "one user at a time" in refused.stderr
        assert (sys1 / "usr/bin/app1").exists()
    finally:
        shell.close()
    out = a1.run("logout", "alice", "--json").stdout
    assert '"saved": "writable-alice@1"' in out
    for gone in ("usr/bin/app1", "usr/bin/app2", "opt/app1", "etc/app2.conf"):
        assert not (sys1 / gone).exists(), gone
    assert not (sys1 / "home/alice/notes.txt").exists()
    assert (sys1 / "usr/bin/tool").exists() and (sys1 / "home/alice/.profile").exists()


def test_layers_appear_in_the_running_system_live_and_roam(
    cli: Cli, server: Server, tmp_path: Path, agents: list[AgentProc]
) -> None:
    tokens = fleet(cli, tmp_path)
    admin = cli("admin", "token").out.strip()
    server.start()
    a1, sys1 = system_agent(tmp_path, "m1", server.http_url, tokens[0])
    a2, sys2 = system_agent(tmp_path, "m2", server.http_url, tokens[1])
    agents += [a1, a2]
    http = httpx.Client(
        base_url=f"{server.http_url}/api/v1", headers={"Authorization": f"Bearer {admin}"}
    )
    alice_on_m1(a1, sys1, http)

    # bob next, on the same machine: his session, not hers
    a1.run("login", "bob")
    assert not (sys1 / "usr/bin/app1").exists() and (sys1 / "usr/bin/tool").exists()
    (sys1 / "home/bob/bob.txt").write_text("bob\n")
    a1.run("logout", "bob")
    assert not (sys1 / "home/bob/bob.txt").exists()

    # alice on the other machine: her file and both apps
    a2.run("login", "alice")
    assert (sys2 / "home/alice/notes.txt").read_text() == "remember\n"
    assert (sys2 / "usr/bin/app1").exists() and (sys2 / "usr/bin/app2").exists()
    # revoked while logged in: gone within 2 s
    http.request("DELETE", "/entitlements", params={"layer": "app1", "user": "alice"})
    wait_for(lambda: not (sys2 / "usr/bin/app1").exists(), 2.0)
    assert (sys2 / "usr/bin/app2").exists()
    # a process still inside her session does not hold the logout up
    holder = subprocess.Popen(["sleep", "60"], cwd=sys2 / "home/alice")
    try:
        a2.run("logout", "alice")
        assert not (sys2 / "usr/bin/app2").exists()
    finally:
        holder.kill()
        holder.wait()
