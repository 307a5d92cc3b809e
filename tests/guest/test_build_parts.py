"""Pieces of ``lamina image build`` that need no root file system: the apt sources it
takes from the host, sizes, the build key, the PAM hook."""

from __future__ import annotations

import json
import os
import pwd
import runpy
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from lamina.errors import UsageError
from lamina.guest import build, debian, disk

DEB822 = """\
Types: deb deb-src
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian
Suites: trixie
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
"""


def test_host_sources_for_one_release(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "vendor.list").write_text(
        "deb [arch=amd64 signed-by=/k.gpg] https://vendor.example/apt bookworm-extra main\n"
        "deb https://other.example/apt stable main  # not ours\n"
    )
    (tmp_path / "sources.list").write_text("# deb http://old.example/debian bookworm main\n")
    keyring = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    assert debian.host_sources("bookworm", tmp_path) == [
        f"deb {keyring}http://mirror.example/debian bookworm main contrib",
        f"deb {keyring}http://mirror.example/debian bookworm-updates main contrib",
        f"deb {keyring}http://mirror.example/debian-security bookworm-security main",
        "deb [signed-by=/k.gpg] https://vendor.example/apt bookworm-extra main",
    ]
    assert debian.host_sources("trixie", tmp_path) == [
        "deb http://mirror.example/debian trixie main"
    ]
    assert debian.host_sources("bullseye", tmp_path) == []


def test_names_and_sizes_are_checked() -> None:
    assert disk.parse_size("4G") == 4 << 30
    assert disk.parse_size("4096M") == 4 << 30
    assert disk.parse_size("2GiB") == 2 << 30
    assert disk.parse_size("1048576") == 1 << 20
    with pytest.raises(UsageError, match="bad size"):
        disk.parse_size("4 gallons")
    with pytest.raises(UsageError, match="bad Debian package name"):
        debian.check_packages(["cowsay", "rm -rf"])
    with pytest.raises(UsageError, match="unknown Debian release"):
        debian.check_suite("sid; reboot")


def test_the_build_key_follows_every_input() -> None:
    spec = build.Spec("debian12")
    mirrors = ["deb http://mirror.example/debian bookworm main"]
    key = build.build_key(spec, mirrors)
    assert build.build_key(build.Spec("debian12"), mirrors) == key
    for other in (
        build.Spec("debian12", include=("cowsay",)),
        build.Spec("debian12", size=8 << 30),
        build.Spec("other"),  # the base layer name is written into the image
        build.Spec("debian12", suite="trixie"),
    ):
        assert build.build_key(other, mirrors) != key
    assert build.build_key(spec, [*mirrors, "deb http://x/ bookworm-updates main"]) != key
    assert disk.fs_uuid(key) == disk.fs_uuid(key) and len(disk.fs_uuid(key)) == 36


# -- the PAM session hook ---------------------------------------------------------------------

HOOK = Path(__file__).parents[2] / "src/lamina/guest/files/lamina-pam-session"


class Agent:
    """A unix socket answering like the agent, recording what it was asked."""

    def __init__(self, path: Path, reply: dict[str, Any]) -> None:
        self.asked: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.reply = reply
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.asked.append(json.loads(conn.makefile().readline()))
                conn.sendall(json.dumps(self.reply).encode() + b"\n")


def run_hook(
    monkeypatch: pytest.MonkeyPatch,
    sock: Path,
    env: dict[str, str],
    *,
    wait: float = 0.3,
    uid_min: int = 0,
) -> dict[str, Any]:
    """The hook as pam_exec runs it, with its socket and UID_MIN pointed elsewhere (uid_min
    0: root counts as a user, so no account has to be made on this host)."""
    hook = runpy.run_path(str(HOOK), run_name="lamina_pam_session")
    hook["main"].__globals__["SOCKET"] = str(sock)
    hook["main"].__globals__["WAIT_FOR_AGENT"] = wait
    hook["main"].__globals__["uid_min"] = lambda: uid_min
    for key in ("PAM_TYPE", "PAM_USER"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {"code": hook["main"]()}


def test_pam_hook_logs_users_in_and_out_and_leaves_system_accounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    user = pwd.getpwuid(0).pw_name
    agent = Agent(tmp_path / "agent.sock", {"ok": True, "result": {}})
    for kind, op in (("open_session", "login"), ("close_session", "logout")):
        env = {"PAM_TYPE": kind, "PAM_USER": user}
        assert run_hook(monkeypatch, tmp_path / "agent.sock", env) == {"code": 0}
        assert agent.asked[-1] == {"op": op, "user": user}
    asked = len(agent.asked)
    system = {"PAM_TYPE": "open_session", "PAM_USER": user}  # below UID_MIN: left alone
    assert run_hook(monkeypatch, tmp_path / "agent.sock", system, uid_min=1000) == {"code": 0}
    for env in (
        {"PAM_TYPE": "open_session", "PAM_USER": "no-such-user-here"},
        {"PAM_TYPE": "auth", "PAM_USER": user},  # not a session
    ):
        assert run_hook(monkeypatch, tmp_path / "agent.sock", env) == {"code": 0}
    assert len(agent.asked) == asked
    # a refusal is shown to the user, the login goes on
    Agent(tmp_path / "refusing.sock", {"ok": False, "error": "bob's session holds this machine"})
    env = {"PAM_TYPE": "open_session", "PAM_USER": user}
    assert run_hook(monkeypatch, tmp_path / "refusing.sock", env) == {"code": 0}
    assert f"lamina: login {user}: bob's session holds this machine" in capsys.readouterr().out
    # no agent: said so, and the login goes on
    assert run_hook(monkeypatch, tmp_path / "none.sock", env, wait=0.2) == {"code": 0}
    assert "the agent does not answer" in capsys.readouterr().out
    assert os.path.exists(HOOK)
