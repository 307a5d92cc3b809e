"""`machine move` through the HTTP API (POST /api/v1/machines/NAME/move) on a real
`lamina serve --server-name`, through the CLI with --manager and the console's form: the
same service as the CLI on the home, the same answers and refusals, audited."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lamina.manager.home import open_home
from lamina.manager.services import servers
from tests.conftest import Cli, write_sparse
from tests.console.test_http import signed_in
from tests.nbdtools import ok, qemu_io
from tests.servers import Server

pytestmark = pytest.mark.peers

MiB = 1 << 20


@pytest.fixture
def server_a(cli: Cli, tmp_path: Path) -> Iterator[Server]:
    """Block server `a` with its manager on the home; `b` a server of the same database
    elsewhere (its row only: it is not asked anything)."""
    cli("image", "import", "base", str(write_sparse(tmp_path / "d.raw", 2 * MiB, [])))
    srv = Server(cli.home, tmp_path / "serve.log", args=("--server-name", "a"))
    srv.start()
    home = open_home(cli.home)
    try:
        with home.session() as session:
            servers.register(session, name="b", nbd_address="10.0.0.2:10809", heartbeat=3600)
            servers.register(session, name="gone", nbd_address="10.0.0.3:10809")
            servers.stop(session, name="gone")
    finally:
        home.close()
    yield srv
    srv.stop(signal.SIGTERM)


def test_move_through_the_api_and_the_cli_with_manager(
    cli: Cli, server_a: Server, tmp_path: Path
) -> None:
    token = cli("admin", "token").out.strip()
    api = httpx.Client(
        base_url=f"{server_a.http_url}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    )
    cli("machine", "add", "sf", "--image", "base", "--mode", "stateful")
    assert cli.json("machine", "show", "sf")["server"] == "a"  # the live one with no machine
    ok(qemu_io(server_a.url("machine/sf"), f"write -P 0x5a 0 {MiB}", "flush"))

    refused = {
        "nowhere": (404, "NotFound"),  # no such server
        "gone": (409, "Conflict"),  # stopped: not live
        "a": (422, "UsageError"),  # where it is already
    }
    for to, (status, kind) in refused.items():
        answer = api.post("/machines/sf/move", json={"to": to})
        assert (answer.status_code, answer.json()["kind"]) == (status, kind), answer.text
    assert api.post("/machines/sf/move", json={"to": "no such!"}).status_code == 422
    assert cli.json("machine", "show", "sf")["server"] == "a"  # nothing moved

    moved = api.post("/machines/sf/move", json={"to": "b"})
    assert moved.status_code == 200, moved.text
    assert moved.json() == {
        "name": "sf",
        "server": "b",
        "nbd_server": "10.0.0.2:10809",
        "committed": "sf.state@1",
    }
    shown = api.get("/machines/sf").json()
    assert shown["server"] == "b" and shown["image"] == "sf.state@1"
    # the delta went into the store: the version holds what the machine wrote
    read = ok(qemu_io(server_a.url("sf.state@1"), "read -P 0x5a 0 1M", read_only=True))
    assert "read 1048576/1048576" in read

    # the CLI through the manager: the same route, the same answer as on the home
    cli("machine", "add", "sl", "--image", "base")
    assert cli.json("machine", "show", "sl")["server"] == "a"  # b has sf now
    via = Cli(tmp_path / "elsewhere")
    answer = via.json(
        "machine", "move", "sl", "--to", "b", "--manager", server_a.http_url, "--token", token
    )
    assert answer == {
        "name": "sl",
        "server": "b",
        "nbd_server": "10.0.0.2:10809",
        "committed": None,
    }
    again = via(
        "machine", "move", "sl", "--to", "b", "--manager", server_a.http_url, "--token", token,
        check=False,
    )  # fmt: skip
    local = cli("machine", "move", "sl", "--to", "b", check=False)
    assert again.code == local.code == 2 and "served by b already" in again.err + local.err

    moves = [e for e in cli.json("audit") if e["action"] == "machine.move"]
    assert sorted((e["target"], e["via"]) for e in moves) == [("sf", "api"), ("sl", "api")]

    # the console: the machine's page offers the live servers it is not on, and moves
    with signed_in(server_a.http_url, token) as (client, csrf):
        page = client.get("/machines/sl").text
        assert '<option value="a">a</option>' in page and "gone" not in page
        done = client.post("/machines/sl/move", data={"csrf": csrf, "to": "a"})
        assert done.status_code == 303
        flash = client.get(done.headers["location"]).text
        assert f"sl: served by a at 127.0.0.1:{server_a.port}" in flash
        refused = client.post("/machines/sl/move", data={"csrf": csrf, "to": "gone"})
        assert "block server gone is not live" in client.get(refused.headers["location"]).text
    assert cli.json("machine", "show", "sl")["server"] == "a"
