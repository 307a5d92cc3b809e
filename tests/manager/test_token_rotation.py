"""Bearer tokens rotate: after `lamina machine token NAME --rotate` or `lamina admin token
--rotate` a running manager refuses the old token (401) and takes the new one, on the
agent API and the admin API alike; a machine's seed carries its new token."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tests.conftest import Cli, write_sparse
from tests.servers import Server


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _machine(cli: Cli, tmp_path: Path) -> str:
    image = write_sparse(tmp_path / "base.raw", 4 << 20, [(0, os.urandom(1 << 20))])
    cli("image", "import", "base", str(image))
    added = cli.json("machine", "add", "m1", "--image", "base")
    token: str = added["token"]
    return token


def test_a_rotated_machine_token_is_refused_and_the_new_one_served(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    old = _machine(cli, tmp_path)
    assert cli("machine", "token", "m1").out.strip() == old  # the token its seed carries
    server.start()
    desired = f"{server.http_url}/api/v1/agent/desired"
    with httpx.Client(timeout=30) as http:
        assert http.get(desired, headers=bearer(old)).status_code == 200
        rotated = cli.json("machine", "token", "m1", "--rotate")
        new = rotated["token"]
        assert rotated["rotated"] and new != old
        assert http.get(desired, headers=bearer(old)).status_code == 401
        assert http.get(desired, headers=bearer(new)).status_code == 200
    # the seed disk hands the machine its new token (shown by `machine token` as such)
    assert cli("machine", "token", "m1").out.strip() == new
    # twice: each rotation ends the token before it
    newer = cli.json("machine", "token", "m1", "--rotate")["token"]
    with httpx.Client(timeout=30) as http:
        assert http.get(desired, headers=bearer(new)).status_code == 401
        assert http.get(desired, headers=bearer(newer)).status_code == 200
    assert cli("machine", "token", "nope", check=False).code != 0


def test_a_rotated_admin_token_is_refused_and_the_new_one_served(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    _machine(cli, tmp_path)
    old = cli("admin", "token").out.strip()
    server.start()
    machines = f"{server.http_url}/api/v1/machines"
    with httpx.Client(timeout=30) as http:
        assert http.get(machines, headers=bearer(old)).status_code == 200
        rotated = cli.json("admin", "token", "--rotate")
        new = rotated["token"]
        assert rotated["rotated"] and new != old
        assert http.get(machines, headers=bearer(old)).status_code == 401
        assert http.get(machines, headers=bearer(new)).status_code == 200
    assert cli("admin", "token").out.strip() == new
    # the built-in account rotates the same way through `admin account token admin`
    newer = cli.json("admin", "account", "token", "admin")["token"]
    assert newer != new
    with httpx.Client(timeout=30) as http:
        assert http.get(machines, headers=bearer(new)).status_code == 401
        assert http.get(machines, headers=bearer(newer)).status_code == 200
