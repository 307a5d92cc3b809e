"""Machines with no disk boot the demo image from a real `lamina serve` over the network:
qemu's iPXE ROM, qemu's user networking (its DHCP and TFTP; the guest reaches the host's
loopback at 10.0.2.2 and nothing else), lamina's boot script chosen by MAC, and the
demo init rooting itself on machine/NAME with nbd-client.

The first test (two machines and a newcomer at once) runs in ``make test``; the others
boot more VMs one after another under TCG and run in ``make e2e``."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from lamina.demo.image import DemoImage
from lamina.demo.pxe import HOST_FROM_GUEST, PxeVm
from tests.conftest import Cli
from tests.servers import Server

pytestmark = [pytest.mark.peers, pytest.mark.slow]

MACS = {"desk-001": "52:54:00:10:00:01", "desk-002": "52:54:00:10:00:02"}
NEWCOMER = "52:54:00:10:00:03"
UNKNOWN = "is not known to the manager"


def base(server: Server) -> str:
    return f"http://{HOST_FROM_GUEST}:{server.http_port}"


@pytest.fixture
def fleet(cli: Cli, demo: DemoImage, server: Server) -> dict[str, str]:
    """desk-001 (stateless) and desk-002 (stateful) with known MACs; their machine-ids."""
    cli("image", "import", "demo", str(demo.path))
    cli("machine", "add", "desk-001", "--image", "demo", "--mac", MACS["desk-001"])
    cli(
        "machine",
        "add",
        "desk-002",
        "--image",
        "demo",
        "--mac",
        MACS["desk-002"],
        "--mode",
        "stateful",
    )
    server.start()
    return {n: cli.json("machine", "show", n)["machine_id"] for n in MACS}


@pytest.mark.e2e  # boots a VM under TCG: in make e2e, beside the other VM runs
def test_two_machines_boot_by_mac_and_a_newcomer_waits_until_added(
    cli: Cli, server: Server, fleet: dict[str, str], tmp_path: Path
) -> None:
    vms = {n: PxeVm(n, mac, tmp_path, base(server)) for n, mac in MACS.items()}
    newcomer = PxeVm("newcomer", NEWCOMER, tmp_path, base(server))
    assert not any(arg.startswith(("-drive", "-hd", "-cdrom")) for arg in newcomer.command)
    try:
        for vm in [*vms.values(), newcomer]:
            vm.start()
        newcomer.wait_for("asking again in")  # the message's last line: all of it is shown
        assert UNKNOWN in newcomer.console() and f"--mac {NEWCOMER}" in newcomer.console()
        (new,) = cli.json("machine", "list", "--new")
        assert (new["mac"], new["platform"]) == (NEWCOMER, "pcbios")
        cli("machine", "add", "desk-003", "--image", "demo", "--mac", NEWCOMER)
        reports = {n: vm.wait() for n, vm in vms.items()}
        late = newcomer.wait()
    finally:
        for vm in [*vms.values(), newcomer]:
            vm.kill()
    for name, report in reports.items():
        assert (report.hostname, report.machine_id, report.marker) == (name, fleet[name], False)
        assert f"lamina: {MACS[name]} is {name}, booting demo@1" in vms[name].console()
    assert late.hostname == "desk-003"
    assert late.machine_id == cli.json("machine", "show", "desk-003")["machine_id"]
    assert cli.json("machine", "list", "--new") == []
    connects = [line for line in server.log_lines() if '"event": "connect"' in line]
    assert any('"export": "machine/desk-003"' in line for line in connects)
    assert any('"export": "machine/desk-003/seed"' in line for line in connects)


@pytest.mark.e2e
def test_a_stateless_machine_reboots_clean(
    cli: Cli, server: Server, fleet: dict[str, str], tmp_path: Path
) -> None:
    def boot_both(label: str) -> dict[str, bool]:
        vms = {n: PxeVm(f"{n}-{label}", mac, tmp_path, base(server)) for n, mac in MACS.items()}
        try:
            for vm in vms.values():
                vm.start()
            return {n: vm.wait().marker for n, vm in vms.items()}
        finally:
            for vm in vms.values():
                vm.kill()

    assert boot_both("first") == {"desk-001": False, "desk-002": False}
    # each powered off after disconnecting its disks cleanly (NBD_CMD_DISC)
    disconnects = [line for line in server.log_lines() if '"event": "disconnect"' in line]
    assert sum('"export": "machine/desk-00' in line for line in disconnects) >= 4
    server.stop(signal.SIGTERM)  # a restart keeps deltas: clean only after a clean power-off
    server.start()
    assert boot_both("again") == {"desk-001": False, "desk-002": True}


@pytest.mark.e2e
def test_a_uefi_machine_boots_the_same_way(
    server: Server, fleet: dict[str, str], tmp_path: Path
) -> None:
    with PxeVm("desk-001", MACS["desk-001"], tmp_path, base(server), firmware="uefi") as vm:
        report = vm.wait()
        assert "net0: 52:54:00:10:00:01 using" in vm.console()  # iPXE's EFI build, in the ROM
    assert (report.hostname, report.machine_id) == ("desk-001", fleet["desk-001"])
    scripts = [line for line in server.log_lines() if '"event": "netboot"' in line]
    assert len(scripts) == 1 and '"machine": "desk-001"' in scripts[0]


@pytest.mark.e2e
def test_lamina_demo_pxe(cli: Cli, demo: DemoImage) -> None:
    """`lamina demo --pxe` for a newcomer: two diskless machines and one added while it waits."""
    cache = cli.home / "cache" / "demo"
    cache.mkdir(parents=True)
    for item in demo.path.parent.iterdir():
        if item.is_file():
            (cache / item.name).write_bytes(item.read_bytes())
    result = json.loads(
        cli("demo", "--pxe", "--json", "--nbd-port", "0", "--http-port", "0", timeout=600).out
    )
    assert result["pxe"] is True and result["newcomers"] == ["desk-003"]
    boots = {(b["round"], b["machine"]): b for b in result["boots"]}
    assert {m for r, m in boots if r == "boot 1"} == {"desk-001", "desk-002", "desk-003"}
    assert all(b["hostname"] == m for (_, m), b in boots.items())
    assert not boots[("boot 2", "desk-001")]["marker"]  # stateless: clean again
    assert boots[("boot 2", "desk-002")]["marker"]  # stateful: kept its marker
    assert cli.json("machine", "list", "--new") == []  # the newcomer became desk-003
