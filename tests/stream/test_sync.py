"""Streamed machines: local writes, `lamina stream sync` to `machine/NAME` on the server,
interrupted syncs (lost requests, a kill -9 mid-sync), stateless drops."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import LAMINA, Cli
from tests.servers import Server
from tests.stream.conftest import Endpoint, qemu_io
from tests.stream.proxy import Proxy

pytestmark = pytest.mark.peers
MiB = 1 << 20


def sync(cli: Cli, ep: Endpoint, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [LAMINA, "stream", "sync", "--cache", str(ep.cache), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"LAMINA_HOME": str(cli.home), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def has_pattern(url: str, byte: int, offset: int, length: int = 65536) -> bool:
    done = qemu_io(url, f"read -P {byte:#x} {offset} {length}", read_only=True)
    if "Pattern verification failed" in done.stdout:
        return False
    assert done.returncode == 0, done.stdout + done.stderr
    return True


def test_stateful_sync_round_trips_to_the_machine_export(
    cli: Cli, image: Path, server: Server, stream: Callable[..., Endpoint]
) -> None:
    token = cli.json("machine", "add", "m1", "--image", "img", "--mode", "stateful")["token"]
    server.start()
    # the machine already has a delta on the server: the stream starts from it
    assert qemu_io(server.url("machine/m1"), "write -P 0x33 0 65536").returncode == 0
    ep = stream("img", "--from", server.http_url, "--token", token, "--machine", "m1")
    assert has_pattern(ep.url, 0x33, 0)
    assert qemu_io(ep.url, f"write -P 0x5a {MiB} 65536").returncode == 0
    assert ep.status()["local_delta_blocks"] == 16
    assert not has_pattern(server.url("machine/m1"), 0x5A, MiB)  # not synced yet
    result = sync(cli, ep)
    assert '"status": "synced"' in result.stdout and '"blocks": 16' in result.stdout
    assert has_pattern(server.url("machine/m1"), 0x5A, MiB)  # the network copy has it
    assert has_pattern(server.url("machine/m1"), 0x33, 0)
    status = ep.status()
    assert status["local_delta_blocks"] == 0  # cleared once confirmed...
    assert has_pattern(ep.url, 0x5A, MiB)  # ...and still read locally
    assert "nothing to sync" in sync(cli, ep).stdout
    # with the endpoint stopped, sync works from the cache's files
    assert qemu_io(ep.url, f"write -P 0x77 {2 * MiB} 4096").returncode == 0
    ep.stop()
    sync(cli, ep)
    assert has_pattern(server.url("machine/m1"), 0x77, 2 * MiB, 4096)
    # and the machine's delta on the server survives a server restart
    server.stop(signal.SIGKILL)
    server.start()
    assert has_pattern(server.url("machine/m1"), 0x5A, MiB)


@pytest.mark.parametrize("lost", ["fail-before", "fail-after"])
def test_an_interrupted_sync_leaves_both_sides_consistent_and_a_retry_completes(
    lost: str, cli: Cli, image: Path, server: Server, stream: Callable[..., Endpoint]
) -> None:
    token = cli.json("machine", "add", "m1", "--image", "img", "--mode", "stateful")["token"]
    server.start()
    proxy = Proxy(server.http_url)
    try:
        ep = stream("img", "--from", proxy.url, "--token", token, "--machine", "m1")
        assert qemu_io(ep.url, f"write -P 0x5a {MiB} 65536").returncode == 0
        proxy.apply_mode = lost  # the apply request (or its answer) is lost
        failed = sync(cli, ep, check=False)
        assert failed.returncode != 0 and proxy.applies == 1
        applied = has_pattern(server.url("machine/m1"), 0x5A, MiB)
        assert applied == (lost == "fail-after")  # all of it on the server, or nothing
        assert has_pattern(ep.url, 0x5A, MiB)  # the local view never changed
        status = ep.status()
        assert status["sync"] == "upload" and status["local_delta_blocks"] == 16
        # writes go on meanwhile, into a new layer that the retry leaves local
        assert qemu_io(ep.url, f"write -P 0x66 {3 * MiB} 4096").returncode == 0
        proxy.apply_mode = "pass"
        result = sync(cli, ep)
        assert '"resumed": true' in result.stdout
        assert has_pattern(server.url("machine/m1"), 0x5A, MiB)
        assert not has_pattern(server.url("machine/m1"), 0x66, 3 * MiB, 4096)
        assert ep.status()["local_delta_blocks"] == 1 and ep.status()["sync"] is None
        sync(cli, ep)
        assert has_pattern(server.url("machine/m1"), 0x66, 3 * MiB, 4096)
    finally:
        proxy.close()


def test_kill_9_of_the_endpoint_mid_sync_then_a_retried_sync_completes(
    cli: Cli, image: Path, server: Server, stream: Callable[..., Endpoint]
) -> None:
    token = cli.json("machine", "add", "m1", "--image", "img", "--mode", "stateful")["token"]
    server.start()
    proxy = Proxy(server.http_url)
    try:
        ep = stream("img", "--from", proxy.url, "--token", token, "--machine", "m1")
        assert qemu_io(ep.url, f"write -P 0x5a {MiB} 65536").returncode == 0
        proxy.apply_mode = "hold"  # the apply waits in the proxy...
        waiting = threading.Thread(target=sync, args=(cli, ep), kwargs={"check": False})
        waiting.start()
        assert proxy.held.wait(30)
        ep.stop(signal.SIGKILL)  # ...while the endpoint dies
        waiting.join(30)
        proxy.apply_mode = "pass"
        proxy.released.set()  # the held apply reaches the manager late: harmless
        time.sleep(0.5)
        ep.start()
        assert has_pattern(ep.url, 0x5A, MiB)
        assert ep.status()["sync"] == "upload"
        assert '"status": "synced"' in sync(cli, ep).stdout
        assert has_pattern(server.url("machine/m1"), 0x5A, MiB)
        assert ep.status()["local_delta_blocks"] == 0
    finally:
        proxy.close()


def test_a_stateless_machine_drops_its_local_writes_at_restart(
    cli: Cli, image: Path, server: Server, stream: Callable[..., Endpoint]
) -> None:
    token = cli.json("machine", "add", "m1", "--image", "img")["token"]
    server.start()
    ep = stream("img", "--from", server.http_url, "--token", token, "--machine", "m1")
    assert qemu_io(ep.url, f"write -P 0x5a {MiB} 65536").returncode == 0
    assert has_pattern(ep.url, 0x5A, MiB)
    failed = sync(cli, ep, check=False)
    assert failed.returncode != 0 and "stateless" in failed.stderr
    ep.stop()
    server.stop(signal.SIGKILL)  # offline restart: the drop needs no manager
    ep.start()
    assert not has_pattern(ep.url, 0x5A, MiB)
    assert ep.status()["local_delta_blocks"] == 0


def test_a_machine_token_opens_only_its_own_machine(
    cli: Cli, image: Path, server: Server, stream: Callable[..., Endpoint], tmp_path: Path
) -> None:
    cli.json("machine", "add", "m1", "--image", "img", "--mode", "stateful")
    other = cli.json("machine", "add", "m2", "--image", "img")["token"]
    server.start()
    proc = subprocess.run(
        [LAMINA, "stream", "img", "--from", server.http_url, "--token", other,
         "--machine", "m1", "--cache", str(tmp_path / "c"), "--nbd", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, check=False,
        env={"LAMINA_HOME": str(cli.home), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 12 and "a machine token opens only its machine" in proc.stderr
    assert not (tmp_path / "c" / "config.json").exists()


def test_uploads_need_a_stateful_machine_and_a_reset_drops_the_staged_ones(
    cli: Cli, image: Path, server: Server
) -> None:
    import httpx

    from lamina.delta import uploads
    from lamina.manager.home import open_home

    keeps = cli.json("machine", "add", "m1", "--image", "img", "--mode", "stateful")["token"]
    drops = cli.json("machine", "add", "m2", "--image", "img")["token"]
    server.start()
    uid = "ab" * 16
    with httpx.Client(base_url=server.http_url + "/api/v1") as http:

        def put(name: str, token: str) -> httpx.Response:
            return http.put(
                f"/stream/machines/{name}/uploads/{uid}",
                content=b"part",
                headers={"Authorization": f"Bearer {token}"},
            )

        assert put("m2", drops).status_code == 409
        first = put("m1", keeps).json()
        assert first["received"] == 4 and not first["applied"]
        staged = uploads.uploads_dir(open_home(cli.home), "m1") / uid
        assert staged.exists()
        cli("machine", "reset", "m1")
        assert not staged.exists()
        state = http.get(
            f"/stream/machines/m1/uploads/{uid}", headers={"Authorization": f"Bearer {keeps}"}
        )
        assert state.json()["received"] == 0
        # a re-pin and a turn to stateless drop them too
        with open(image, "r+b") as f:  # a new version of the disk
            f.write(b"v2")
        cli("image", "import", "img", str(image))
        for change in (["--image", "img@2"], ["--mode", "stateless"]):
            assert put("m1", keeps).json()["received"] == 4
            cli("machine", "set", "m1", *change)
            assert not staged.exists(), change
