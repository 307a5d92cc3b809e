"""Real VMs booting from `lamina serve`: one image version, two machines, their own identity."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from lamina.demo.image import DemoImage
from lamina.demo.vm import BootReport, boot_async
from lamina.errors import ToolError
from tests.conftest import Cli
from tests.servers import Server


def boot_both(server: Server) -> dict[str, BootReport]:
    async def run() -> list[BootReport]:
        return await asyncio.gather(
            *(
                boot_async(server.url(f"machine/{n}"), server.url(f"machine/{n}/seed"))
                for n in ("desk-001", "desk-002")
            )
        )

    return dict(zip(("desk-001", "desk-002"), asyncio.run(run()), strict=True))


@pytest.mark.e2e  # boots a VM under TCG: in make e2e, beside the other VM runs
def test_two_vms_boot_one_image_version_with_their_own_identity(
    cli: Cli, server: Server, demo: DemoImage
) -> None:
    assert cli("image", "import", "demo", str(demo.path)).out.strip() == "demo@1"
    cli("machine", "add", "desk-001", "--image", "demo@1", "--mode", "stateless")
    cli("machine", "add", "desk-002", "--image", "demo@1", "--mode", "stateful")
    ids = {n: cli.json("machine", "show", n)["machine_id"] for n in ("desk-001", "desk-002")}
    assert ids["desk-001"] != ids["desk-002"]
    server.start()

    first = boot_both(server)
    for name, report in first.items():
        assert report.hostname == name and report.machine_id == ids[name]
        assert not report.marker

    # booted again, nothing done in between: a power-off (qemu says NBD_CMD_DISC) ended
    # the stateless machine's boot, so it starts clean; the stateful one keeps its disk
    again = boot_both(server)
    assert not again["desk-001"].marker and again["desk-002"].marker

    cli("machine", "reset", "desk-001")  # while served: no client is connected any more
    server.stop(signal.SIGTERM)
    server.start()
    second = boot_both(server)
    assert not second["desk-001"].marker  # stateless: the reset dropped its marker
    assert second["desk-002"].marker  # stateful: kept across the server restart
    assert {n: r.machine_id for n, r in second.items()} == ids
    listed = {m["name"]: m for m in cli.json("machine", "list")}
    assert listed["desk-002"]["delta_bytes"] > 0


def test_lamina_demo_runs_end_to_end(cli: Cli, demo: DemoImage) -> None:
    # the demo builds its image into the home: seed the cache with the test build
    cache = cli.home / "cache" / "demo"
    cache.mkdir(parents=True)
    for item in demo.path.parent.iterdir():
        (cache / item.name).write_bytes(item.read_bytes())
    result = json.loads(
        cli("demo", "--json", "--nbd-port", "0", "--http-port", "0", timeout=300).out
    )
    boots = {(b["round"], b["machine"]): b for b in result["boots"]}
    assert boots[("boot 1", "desk-001")]["hostname"] == "desk-001"
    assert not boots[("boot 2", "desk-001")]["marker"]
    assert boots[("boot 2", "desk-002")]["marker"]
    assert result["deltas"]["desk-002"] > 0


@pytest.mark.e2e  # boots a VM under TCG: in make e2e, beside the other VM runs
def test_a_vm_boots_over_tls_with_its_machine_credential(
    cli: Cli, demo: DemoImage, tmp_path: Path
) -> None:
    """qemu opens its disk and seed over NBD with TLS, with the files `lamina machine
    credentials` wrote; the other machine's credential does not open them."""
    cli("image", "import", "demo", str(demo.path))
    cli("machine", "add", "desk-001", "--image", "demo@1", "--mode", "stateful")
    cli("machine", "add", "desk-002", "--image", "demo@1", "--mode", "stateful")
    server = Server(cli.home, tmp_path / "serve.log", args=("--tls",))
    server.start()
    try:
        creds = {}
        for name in ("desk-001", "desk-002"):
            creds[name] = tmp_path / name
            cli("machine", "credentials", name, "--out", str(creds[name]),
                "--server", f"127.0.0.1:{server.port}")  # fmt: skip
        disk, seed = server.url("machine/desk-001"), server.url("machine/desk-001/seed")
        report = asyncio.run(boot_async(disk, seed, tls=creds["desk-001"]))
        assert report.hostname == "desk-001"
        with pytest.raises(ToolError, match="is not open to the credential of machine desk-002"):
            asyncio.run(boot_async(disk, seed, tls=creds["desk-002"]))
    finally:
        server.stop()
    connects = [json.loads(ln) for ln in server.log_lines() if '"connect"' in ln]
    assert {c["credential"] for c in connects} == {"machine desk-001"}
