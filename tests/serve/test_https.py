"""`lamina serve --tls` over HTTP: the API and console answer only HTTPS, and lamina's
own clients (the CLI's --manager, the agent, lamina stream) check the server certificate
against the CA they are given."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lamina.trust.contexts import client_context
from tests.conftest import LAMINA, Cli
from tests.servers import Server, wait_for
from tests.stream.conftest import Endpoint, convert, make_image


@pytest.fixture
def tls_server(cli: Cli, tmp_path: Path) -> Iterator[Server]:
    srv = Server(cli.home, tmp_path / "serve.log", args=("--tls",))
    yield srv
    srv.stop()


@pytest.fixture
def ca(cli: Cli, tls_server: Server) -> Path:
    tls_server.start()
    return cli.home / "tls" / "ca-cert.pem"


def lamina(*args: str, ca: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with ``$LAMINA_CA`` set to ``ca`` (or unset)."""
    env = {k: v for k, v in os.environ.items() if k != "LAMINA_CA"}
    if ca is not None:
        env["LAMINA_CA"] = str(ca)
    return subprocess.run(
        [LAMINA, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_the_api_and_console_answer_only_https(cli: Cli, tls_server: Server, ca: Path) -> None:
    token = cli("admin", "token").out.strip()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(verify=client_context(ca), base_url=tls_server.http_url) as http:
        assert http.get("/api/v1/images", headers=headers).status_code == 200
        assert http.get("/login").status_code == 200
    plain = tls_server.http_url.replace("https:", "http:")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/api/v1/images", headers=headers, timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_server.http_url}/login", timeout=5)  # the system's CAs: unknown
    login = [ln for ln in tls_server.log_lines() if "lamina console:" in ln]
    assert login and login[0].split()[-1].startswith("https://")


def test_manager_commands_check_the_certificate(
    cli: Cli, tls_server: Server, ca: Path, tmp_path: Path
) -> None:
    token = cli("admin", "token").out.strip()
    remote = ["--manager", tls_server.http_url, "--token", token]
    bad = lamina("user", "add", "alice", *remote)
    assert bad.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in bad.stderr
    good = lamina("user", "add", "alice", *remote, ca=ca)
    assert good.returncode == 0, good.stderr
    assert [u["name"] for u in cli.json("user", "list")] == ["alice"]


def start_agent(base: Path, url: str, token: str, *ca: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LAMINA_HOME": str(base / "home")}
    env.pop("LAMINA_CA", None)
    base.mkdir(parents=True)
    with open(base / "agent.log", "wb") as log:
        return subprocess.Popen(
            [LAMINA, "agent", "--manager", url, "--token", token, "--etc", str(base / "etc"), *ca],
            env=env,
            stdout=log,
            stderr=log,
        )


def test_the_agent_checks_the_manager_with_its_ca(
    cli: Cli, tls_server: Server, ca: Path, tmp_path: Path
) -> None:
    cli("image", "import", "base", str(make_image(tmp_path / "d.raw")))
    token = cli.json("machine", "add", "m1", "--image", "base")["token"]
    creds = tmp_path / "creds"
    cli("machine", "credentials", "m1", "--out", str(creds), "--server", "127.0.0.1:1")
    without = start_agent(tmp_path / "a1", tls_server.http_url, token)
    with_ca = start_agent(tmp_path / "a2", tls_server.http_url, token, "--ca", str(creds))
    try:
        wait_for((tmp_path / "a2" / "etc" / "hostname").exists, 30)
        assert (tmp_path / "a2" / "etc" / "hostname").read_text() == "m1\n"
        log = tmp_path / "a1" / "agent.log"
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in log.read_text(), 30)
        assert not (tmp_path / "a1" / "etc" / "hostname").exists()
    finally:
        for proc in (without, with_ca):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def test_stream_from_an_https_manager_keeps_its_ca(
    cli: Cli, tls_server: Server, ca: Path, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "img.raw")
    cli("image", "import", "img", str(image))
    token = cli("admin", "token").out.strip()
    cache = tmp_path / "cache"

    def endpoint(*more: str) -> Endpoint:
        args = ["img", "--from", tls_server.http_url, "--token", token, *more]
        return Endpoint(args, cache, cli.home, tmp_path / "stream.log", "img")

    refused = lamina(
        "stream", "img", "--from", tls_server.http_url, "--token", token,
        "--cache", str(tmp_path / "other"), "--nbd", "127.0.0.1:1",
    )  # fmt: skip
    assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr

    ep = endpoint("--ca", str(ca)).start()
    try:
        ep.wait_complete()  # hydration: http.client workers over HTTPS
        assert filecmp.cmp(convert(ep.url, tmp_path / "all.raw"), image, shallow=False)
    finally:
        ep.stop()
    assert (cache / "ca-cert.pem").read_bytes() == ca.read_bytes()
    again = endpoint().start()  # no --ca: the cache's
    try:
        assert again.status()["complete"]
    finally:
        again.stop()
    assert not [e for e in again.events() if e.get("event") == "manifest-unchecked"]
