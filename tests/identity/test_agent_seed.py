"""A machine's seed carries its agent settings: the manager's URL (``serve --agent-url``)
and the machine's token, which opens the agent API as that machine and no other."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from lamina.identity import read_seed_iso
from tests.conftest import Cli, write_sparse
from tests.servers import Server

pytestmark = pytest.mark.peers

URL = "http://10.0.2.100:8480"


def seed(server: Server, name: str, tmp_path: Path) -> dict[str, bytes]:
    out = tmp_path / f"{name}.iso"
    subprocess.run(["nbdcopy", server.url(f"machine/{name}/seed"), str(out)], check=True)
    files = read_seed_iso(out.read_bytes())
    out.unlink()
    return files


def env_of(files: dict[str, bytes]) -> dict[str, str]:
    lines = files["lamina/agent.env"].decode().splitlines()
    return {k: v.strip("'") for k, _, v in (line.partition("=") for line in lines)}


def boot_as(server: Server, token: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(f"{server.http_url}/api/v1/agent/boot", headers=headers, timeout=10)


def test_seed_carries_url_and_token_that_open_only_this_machine(cli: Cli, tmp_path: Path) -> None:
    cli("image", "import", "base", str(write_sparse(tmp_path / "d.raw", 1 << 20, [])))
    tokens = {m: cli.json("machine", "add", m, "--image", "base")["token"] for m in ("m1", "m2")}
    server = Server(cli.home, tmp_path / "serve.log", args=("--agent-url", URL + "/"))
    server.start()
    try:
        files = {m: seed(server, m, tmp_path) for m in ("m1", "m2")}
        for m in ("m1", "m2"):
            env = env_of(files[m])
            assert env == {"LAMINA_MANAGER": URL, "LAMINA_TOKEN": tokens[m], "LAMINA_MACHINE": m}
            assert boot_as(server, env["LAMINA_TOKEN"]).json()["machine"] == m
        # a new machine-id gives a new token: the old one is refused, the seed has the new
        cli("machine", "set", "m1", "--new-machine-id")
        assert boot_as(server, tokens["m1"]).status_code == 401
        new = env_of(seed(server, "m1", tmp_path))["LAMINA_TOKEN"]
        assert new != tokens["m1"] and boot_as(server, new).json()["machine"] == "m1"
        assert env_of(seed(server, "m2", tmp_path))["LAMINA_TOKEN"] == tokens["m2"]
    finally:
        server.stop()
    # the URL is kept for later serves; '' clears it and seeds carry no agent settings
    server = Server(cli.home, tmp_path / "serve2.log")
    server.start()
    try:
        assert "lamina/agent.env" in seed(server, "m2", tmp_path)
    finally:
        server.stop()
    server = Server(cli.home, tmp_path / "serve3.log", args=("--agent-url", ""))
    server.start()
    try:
        assert "lamina/agent.env" not in seed(server, "m2", tmp_path)
    finally:
        server.stop()


def test_a_bad_agent_url_is_one_line(cli: Cli) -> None:
    result = cli("serve", "--agent-url", "ftp://x", check=False)
    assert result.code == 2 and result.err.strip().splitlines() == [
        "lamina: bad agent URL 'ftp://x': expected http://HOST[:PORT] or https://..."
    ]


def test_an_https_manager_hands_machines_its_ca(cli: Cli, tmp_path: Path) -> None:
    """Off loopback the manager answers HTTPS only: the seed carries the home's CA and
    points the agent at it (LAMINA_CA), so the agent checks the manager it talks to."""
    cli("image", "import", "base", str(write_sparse(tmp_path / "d.raw", 1 << 20, [])))
    cli("machine", "add", "m1", "--image", "base")
    server = Server(
        cli.home, tmp_path / "serve.log", args=("--tls", "--agent-url", "https://10.0.2.2:8443")
    )
    server.start()
    try:
        out = tmp_path / "seed.iso"
        creds = tmp_path / "admin"
        cli("admin", "credentials", "--out", str(creds))
        url = f"nbds://127.0.0.1:{server.port}/machine/m1/seed?tls-certificates={creds}"
        subprocess.run(["nbdcopy", url, str(out)], check=True)
        files = read_seed_iso(out.read_bytes())
    finally:
        server.stop()
    assert files["lamina/ca-cert.pem"] == (cli.home / "tls" / "ca-cert.pem").read_bytes()
    env = env_of(files)
    assert env["LAMINA_MANAGER"] == "https://10.0.2.2:8443"
    assert env["LAMINA_CA"] == "/etc/lamina/ca-cert.pem"
