"""Network boot end to end, beyond qemu's user networking:

- a LAN in network namespaces whose own DHCP server (dnsmasq, addresses only) stays as it
  is, with the proxy-DHCP configuration `lamina netboot dnsmasq` prints served beside it:
  a BIOS machine (iPXE in its card's ROM) and a UEFI one (OVMF's own PXE, which
  chainloads Debian's snponly.efi over TFTP) boot the demo image from `lamina serve`;
- a machine's root disk rides out a 15 s link loss (the NIC's link down in qemu) while the
  machine keeps reading it.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.demo.image import DemoImage
from lamina.demo.initramfs import HOLD_PREFIX
from lamina.demo.pxe import HOST_FROM_GUEST, PxeVm
from tests.conftest import LAMINA, Cli
from tests.demo.conftest import demo
from tests.servers import Server

__all__ = ["demo"]
pytestmark = [pytest.mark.e2e, pytest.mark.peers, pytest.mark.slow]

MiB = 1 << 20
SUBNET = "192.168.77"
SERVER = f"{SUBNET}.1"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Lan:
    """A bridge in namespace ``lan`` (lamina's side: 192.168.77.1, taps for the machines)
    and the network's DHCP server in namespace ``dhcp`` (192.168.77.2), joined by a veth."""

    def __init__(self, workdir: Path, machines: int) -> None:
        tag = f"{os.getpid() % 100000}"
        self.lan, self.dhcp = f"lnb-lan-{tag}", f"lnb-dhcp-{tag}"
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        for ns in (self.lan, self.dhcp):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
        ip("-n", self.lan, "addr", "add", f"{SERVER}/24", "dev", "br0")
        ip("-n", self.lan, "link", "set", "br0", "up")
        for i in range(machines):
            ip("-n", self.lan, "tuntap", "add", f"tap{i}", "mode", "tap")
            ip("-n", self.lan, "link", "set", f"tap{i}", "master", "br0", "up")
        ip(
            "-n",
            self.lan,
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth1",
            "netns",
            self.dhcp,
        )
        ip("-n", self.lan, "link", "set", "veth0", "master", "br0", "up")
        ip("-n", self.dhcp, "addr", "add", f"{SUBNET}.2/24", "dev", "veth1")
        ip("-n", self.dhcp, "link", "set", "veth1", "up")

    def run(self, ns: str, args: list[str], log: str, env: dict[str, str] | None = None) -> None:
        with open(self.workdir / log, "wb") as out:
            self.procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, *args], stdout=out, stderr=out, env=env
                )
            )

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for ns in (self.lan, self.dhcp):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def wait_log(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never showed {text!r}")
        time.sleep(0.1)


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    network = Lan(tmp_path, machines=2)
    try:
        yield network
    finally:
        network.close()


def test_proxy_dhcp_beside_the_networks_own_dhcp_server(
    cli: Cli, demo: DemoImage, lan: Lan, tmp_path: Path
) -> None:
    cli("image", "import", "demo", str(demo.path))
    macs = {"bios-001": "52:54:00:20:00:01", "uefi-001": "52:54:00:20:00:02"}
    for name, mac in macs.items():
        cli("machine", "add", name, "--image", "demo", "--mac", mac)
    # the network's DHCP server: addresses only, it knows nothing of network boot
    lan.run(
        lan.dhcp,
        [DNSMASQ, "--no-daemon", "--port=0", "--interface=veth1", "--bind-interfaces",
         f"--dhcp-range={SUBNET}.100,{SUBNET}.150,1h", f"--dhcp-leasefile={tmp_path}/main.leases"],
        "dhcp.log",
    )  # fmt: skip
    config = cli("netboot", "dnsmasq", "--server", SERVER, "--network", f"{SUBNET}.0/24",
                 "--interface", "br0").out  # fmt: skip
    (tmp_path / "proxy.conf").write_text(config + f"dhcp-leasefile={tmp_path}/proxy.leases\n")
    lan.run(lan.lan, [DNSMASQ, "--no-daemon", "-C", str(tmp_path / "proxy.conf")], "proxy.log")
    env = {**os.environ, "LAMINA_HOME": str(cli.home)}
    lan.run(
        lan.lan,
        [LAMINA, "serve", "--nbd", f"{SERVER}:10809", "--http", f"{SERVER}:8480", "--insecure"],
        "serve.log",
        env,
    )
    wait_log(tmp_path / "serve.log", '"event": "serving"')
    wait_log(tmp_path / "proxy.log", "proxy on subnet")
    launcher = ("ip", "netns", "exec", lan.lan)
    vms = [
        PxeVm("bios-001", macs["bios-001"], tmp_path, "-", launcher=launcher,
              netdev="tap,id=net0,ifname=tap0,script=no,downscript=no"),
        PxeVm("uefi-001", macs["uefi-001"], tmp_path, "-", launcher=launcher, firmware="uefi",
              netdev="tap,id=net0,ifname=tap1,script=no,downscript=no", option_rom=False),
    ]  # fmt: skip
    try:
        for vm in vms:
            vm.start()
        reports = {vm.name: vm.wait(timeout=400) for vm in vms}
    finally:
        for vm in vms:
            vm.kill()
    for name, report in reports.items():
        assert report.hostname == name
    bios, uefi = (vm.console() for vm in vms)
    # its address from the network's DHCP server (192.168.77.100-150), its boot from the proxy
    assert re.search(rf"net0: {SUBNET}\.1[0-5]\d/255\.255\.255\.0", bios)
    assert f"Filename: http://{SERVER}:8480/boot.ipxe" in bios  # from the proxy's answer
    assert "NBP filename is snponly.efi" in uefi  # OVMF's PXE loaded iPXE over TFTP ...
    assert f"Filename: http://{SERVER}:8480/boot.ipxe" in uefi  # ... which got the script URL
    leases = (tmp_path / "main.leases").read_text()
    assert macs["bios-001"] in leases and macs["uefi-001"] in leases  # addresses: theirs
    proxy = (tmp_path / "proxy.log").read_text()
    assert "tftp" in proxy and "sent /usr/lib/ipxe/snponly.efi" in proxy


def test_the_root_disk_rides_out_a_link_loss(
    cli: Cli, demo: DemoImage, server: Server, tmp_path: Path
) -> None:
    """The image's own kernel arguments keep the demo machine up 60 s (lamina.hold),
    reading its root every second; its link goes down for 15 s in the middle."""
    image = tmp_path / "hold.img"
    shutil.copyfile(demo.path, image)
    conf = tmp_path / "extlinux.conf"
    subprocess.run(["debugfs", "-R", f"dump /boot/extlinux/extlinux.conf {conf}", f"{image}?offset={MiB}"],
                   check=True, capture_output=True)  # fmt: skip
    conf.write_text(conf.read_text().replace("panic=-1", "panic=-1 lamina.hold=60"))
    for command in (
        "rm /boot/extlinux/extlinux.conf",
        f"write {conf} /boot/extlinux/extlinux.conf",
    ):
        subprocess.run(
            ["debugfs", "-w", "-R", command, f"{image}?offset={MiB}"],
            check=True,
            capture_output=True,
        )
    cli("image", "import", "hold", str(image))
    cli("machine", "add", "desk-001", "--image", "hold", "--mac", "52:54:00:30:00:01")
    server.start()
    base = f"http://{HOST_FROM_GUEST}:{server.http_port}"
    with PxeVm("desk-001", "52:54:00:30:00:01", tmp_path, base, monitor=True) as vm:
        vm.wait_for(f"{HOLD_PREFIX}n=3 ok")
        vm.monitor("set_link nic0 off")
        down = time.monotonic()
        time.sleep(15)
        vm.monitor("set_link nic0 on")
        up = time.monotonic() - down
        report = vm.wait(timeout=300)
    holds = [line.split() for line in report.console.splitlines() if line.startswith(HOLD_PREFIX)]
    assert len(holds) >= 20 and all(fields[2].startswith("ok=") for fields in holds), holds
    times = [float(fields[-1].removeprefix("t=")) for fields in holds]
    gap = max(b - a for a, b in itertools.pairwise(times))
    assert gap >= 10, f"no read waited for the link ({gap:.1f} s at most between reads)"
    assert gap <= up + 30  # it went on once the link was back
    assert "I/O error" not in report.console and report.hostname == "desk-001"
