"""A Debian machine built with ``lamina image build`` boots from the network under qemu
(TCG), with no disk attached by the host: SeaBIOS, the NIC's iPXE ROM, qemu's DHCP and
TFTP hand it a script that chains lamina's ``/boot.ipxe``; lamina answers with the
image version's own kernel and initrd, whose initramfs (nbd-client's ``nbdroot=`` hook and
the guest kit's script) roots the system on ``machine/NAME`` and attaches the seed.

- the machine comes up with the database's hostname (its login prompt, and over ssh);
- power-on to the login prompt, the same machine of the same image booted the direct way
  (qemu opens the NBD exports as virtio disks) and over PXE, in one run: printed, and
  kept in ``$LAMINA_TEST_CACHE/e2e-netboot-timings.json``;
- ``lamina serve`` restarted under the running machine: its root's connection comes back
  (``lamina-netroot``), a loop writing to the root goes on, with no I/O error and the
  root still read-write.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from lamina.demo.pxe import TFTP_BOOTFILE, PxeVm, clean
from tests.conftest import Cli
from tests.demo.conftest import cache_root
from tests.e2e.machine import HOST_FROM_GUEST, MEMORY_MIB, Machine
from tests.e2e.test_debian_fleet import users_config
from tests.servers import Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

NAME = "net1"  # booted over PXE
DIRECT = "net2"  # the same image booted the direct way, for the timing
BOOT_TIMEOUT = 900.0
OUTAGE = 10.0  # seconds the server stays down under the running machine


def wait_console(path: Path, pattern: str, timeout: float, started: float) -> float:
    """Seconds from ``started`` until ``pattern`` (a regular expression) is on the console."""
    deadline = time.monotonic() + timeout
    while True:
        text = clean(path.read_text(errors="replace")) if path.exists() else ""
        if re.search(pattern, text, re.MULTILINE):
            return time.monotonic() - started
        if time.monotonic() > deadline:
            tail = "\n".join(text.splitlines()[-15:])
            raise AssertionError(f"{path.name} never showed {pattern!r}:\n{tail}")
        time.sleep(0.2)


def direct_boot(machine: Machine) -> float:
    machine.start()
    try:
        return wait_console(machine.console, rf"^{DIRECT} login:", BOOT_TIMEOUT, machine.started)
    finally:
        machine.stop()


def pxe_vm(workdir: Path, mac: str, http_port: int, ssh_port: int) -> PxeVm:
    tftp = workdir / "tftp"
    netdev = (
        f"user,id=net0,tftp={tftp},bootfile={TFTP_BOOTFILE},hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
    )
    base = f"http://{HOST_FROM_GUEST}:{http_port}"
    return PxeVm(NAME, mac, workdir, base, memory_mib=MEMORY_MIB, netdev=netdev)


def server_restart_under(vm: Machine, server: Server, console: Path) -> dict[str, Any]:
    """Restart the server while a loop in the machine writes to its root every second."""
    loop = "i=0; while :; do i=$((i+1)); echo $i >> /var/tmp/ticks; sync; sleep 1; done"
    vm.root(f"setsid sh -c '{loop}' </dev/null >/dev/null 2>&1 &")
    vm.root("until [ -s /var/tmp/ticks ]; do sleep 0.2; done")
    before = int(vm.root("tail -n 1 /var/tmp/ticks"))
    seen = len(clean(console.read_text(errors="replace")))
    server.stop()
    down = time.monotonic()
    # the guest kernel reports the lost connection on the console (an error: shown with quiet)
    deadline = time.monotonic() + 120
    while "nbd0" not in clean(console.read_text(errors="replace"))[seen:]:
        assert time.monotonic() < deadline, "the machine did not notice the server going"
        time.sleep(0.2)
    time.sleep(OUTAGE)  # the outage itself: requests wait for the connection
    server.start()
    restarted = time.monotonic() - down
    # the loop goes on: ten more ticks written after the restart
    started = time.monotonic()
    target = int(vm.root("tail -n 1 /var/tmp/ticks", timeout=600)) + 10
    vm.root(f"until [ $(tail -n 1 /var/tmp/ticks) -ge {target} ]; do sleep 0.5; done", timeout=600)
    return {
        "before": before,
        "down_s": round(restarted, 1),
        "resumed_s": time.monotonic() - started,
    }


def test_a_debian_machine_boots_from_the_network(
    e2e_cli: Cli,
    debian_image: dict[str, Any],
    ssh_key: Path,
    tmp_path: Path,
) -> None:
    cli = e2e_cli
    image = str(debian_image["image"]).partition("@")[0]
    config = tmp_path / "users.yaml"
    config.write_text(users_config(ssh_key))
    for name in (NAME, DIRECT):  # both first boots of a fresh machine
        cli("machine", "add", name, "--image", image, "--mode", "stateless")
        cli("machine", "set", name, "--config", str(config))
        cli("entitle", image, "--machine", name)
    mac = cli.json("machine", "show", NAME)["mac"]
    server = Server(cli.home, tmp_path / "serve.log")
    # the agent answers the PAM session hook at each ssh login (without it a login waits)
    server.args = ("--agent-url", f"http://{HOST_FROM_GUEST}:{server.http_port}")
    server.start()
    try:
        nbd = f"nbd://127.0.0.1:{server.port}"
        direct_mac = cli.json("machine", "show", DIRECT)["mac"]
        direct = Machine(DIRECT, direct_mac, nbd, ssh_key, tmp_path)
        timings = {"direct_nbd_to_login": direct_boot(direct)}

        vm = Machine(NAME, mac, "-", ssh_key, tmp_path / "pxe")  # for its ssh port
        pxe = pxe_vm(tmp_path / "pxe", mac, server.http_port, vm.port)
        with pxe:
            script = pxe.wait_for(f"lamina: {mac} is {NAME}, booting {image}@", BOOT_TIMEOUT)
            wait_console(pxe.console_path, rf"^{NAME} login:", BOOT_TIMEOUT, 0.0)
            timings |= {"pxe_script": script, "pxe_to_login": pxe.seconds()}
            vm.started = time.monotonic()
            vm.wait_ssh(BOOT_TIMEOUT)
            assert vm.ssh("debian", "hostname").strip() == NAME
            # no disk but the network's: the root is nbd0's partition, the seed nbd1
            assert vm.root("findmnt -n -o SOURCE /").strip() == "/dev/nbd0p1"
            assert vm.root("blkid -L cidata").strip() == "/dev/nbd1"
            assert "active" in vm.root("systemctl is-active lamina-netroot")
            restart = server_restart_under(vm, server, pxe.console_path)
            netroot = vm.root("journalctl -b -u lamina-netroot -o cat --no-pager")
            kernel = vm.root("dmesg")
            assert "nbd0: connected again to machine/" + NAME in netroot, netroot
            assert "I/O error" not in kernel, kernel[-2000:]
            assert vm.root("findmnt -n -o OPTIONS /").startswith("rw")
            assert vm.ssh("debian", "hostname").strip() == NAME
    finally:
        server.stop()
    report = {k: round(v, 1) for k, v in timings.items()}
    report["pxe/direct"] = round(timings["pxe_to_login"] / timings["direct_nbd_to_login"], 2)
    print(f"power-on to the login prompt, same image, same run: {report}")
    print(f"server restart under the machine: {restart}")
    (cache_root() / "e2e-netboot-timings.json").write_text(json.dumps(report, indent=2) + "\n")
