"""The iPXE scripts, the kernel command line and the dnsmasq configuration (dnsmasq's
own --test reads every configuration written here)."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from lamina.errors import UsageError
from lamina.netboot import dnsmasq, ipxe
from tests.conftest import Cli

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
TARGET = ipxe.NbdTarget("10.0.2.2", 10809)


def test_entry_script_chains_the_per_mac_url() -> None:
    script = ipxe.entry_script("http://10.0.2.2:8480")
    assert script.startswith("#!ipxe\n")
    chain = next(line for line in script.splitlines() if line.startswith("chain"))
    assert "http://10.0.2.2:8480/boot/${net0/mac}.ipxe?" in chain
    assert "platform=${platform}" in chain and "serial=${serial}" in chain
    assert script.rstrip().endswith("chain --autofree --replace http://10.0.2.2:8480/boot.ipxe")


def test_kernel_arguments_root_the_machine_on_its_export() -> None:
    args = ipxe.kernel_args(
        "console=ttyS0 quiet",
        machine="desk-001",
        mac="52:54:00:12:34:56",
        root_partition=1,
        nbd=TARGET,
    ).split()
    assert args[:2] == ["console=ttyS0", "quiet"]
    assert "nbdroot=10.0.2.2:10809/machine/desk-001" in args
    assert "root=/dev/nbd0p1" in args and "BOOTIF=01-52-54-00-12-34-56" in args
    assert "lamina.seed=10.0.2.2:10809/machine/desk-001/seed" in args
    assert "lamina.tls=1" not in args
    whole = ipxe.kernel_args(
        "", machine="m", mac="52:54:00:12:34:56", root_partition=0,
        nbd=ipxe.NbdTarget("fd00::1", 10809, tls=True),
    ).split()  # fmt: skip
    assert "root=/dev/nbd0" in whole and "nbdroot=[fd00::1]:10809/machine/m" in whole
    assert "lamina.tls=1" in whole


def test_image_arguments_iPXE_would_expand_are_left_out() -> None:  # noqa: N802
    kept, dropped = ipxe.safe_args('quiet ${evil} a||b console=ttyS0,115200n8 x="y"')
    assert kept == "quiet console=ttyS0,115200n8"
    assert dropped == ["${evil}", "a||b", 'x="y"']


def test_wait_script_says_why_and_asks_again() -> None:
    script = ipxe.wait_script("http://h:1", ipxe.unknown_reason("52:54:00:12:34:56"), retry=7)
    assert (
        "echo lamina: this machine (MAC 52:54:00:12:34:56) is not known to the manager." in script
    )
    assert "lamina machine add NAME --image IMAGE --mac 52:54:00:12:34:56" in script
    assert "sleep 7\nchain --autofree --replace http://h:1/boot.ipxe" in script
    # nothing from the database reaches iPXE's ${...} expansion
    assert "$" not in ipxe.wait_script("http://h:1", ["${net0/mac} 'x' $y"]).replace("#!ipxe", "")


def check(config: str, tmp_path: Path) -> None:
    path = tmp_path / "dnsmasq.conf"
    path.write_text(config)
    proc = subprocess.run(
        [DNSMASQ, "--test", "-C", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "syntax check OK" in proc.stderr, proc.stderr


def test_dnsmasq_configuration_passes_its_own_check(tmp_path: Path) -> None:
    config = dnsmasq.ProxyConfig(
        "http://192.168.1.10:8480/boot.ipxe", dnsmasq.parse_network("192.168.1.0/24"), "eth0"
    )
    text = dnsmasq.render(config)
    check(text, tmp_path)
    assert "dhcp-range=192.168.1.0,proxy,255.255.255.0" in text
    assert "dhcp-match=set:ipxe,175" in text
    assert 'pxe-service=tag:!ipxe,x86PC,"lamina: loading iPXE",undionly.kpxe' in text
    assert 'pxe-service=tag:!ipxe,x86-64_EFI,"lamina: loading iPXE",snponly.efi' in text
    assert "dhcp-boot=tag:ipxe,http://192.168.1.10:8480/boot.ipxe" in text
    assert (dnsmasq.TFTP_ROOT / dnsmasq.BIOS_LOADER).exists()  # Debian's ipxe package
    assert (dnsmasq.TFTP_ROOT / dnsmasq.UEFI_LOADER).exists()


@pytest.mark.parametrize(
    "url, network, interface, error",
    [
        ("http://h:1/boot.ipxe,evil", "10.0.0.0/8", None, "URL"),
        ("ftp://h/boot.ipxe", "10.0.0.0/8", None, "URL"),
        ("http://h/boot.ipxe", "10.0.0.0/8", "eth0\ndhcp-range", "interface"),
    ],
)
def test_dnsmasq_refuses_what_would_break_its_file(
    url: str, network: str, interface: str | None, error: str
) -> None:
    with pytest.raises(UsageError, match=error):
        dnsmasq.ProxyConfig(url, dnsmasq.parse_network(network), interface)
    with pytest.raises(UsageError, match="IPv4"):
        dnsmasq.parse_network("fd00::/64")
    assert dnsmasq.parse_network("10.1.2.3/16") == ipaddress.IPv4Network("10.1.0.0/16")


def test_lamina_netboot_dnsmasq(cli: Cli, tmp_path: Path) -> None:
    text = cli("netboot", "dnsmasq", "--server", "10.9.0.5", "--network", "10.9.0.0/16").out
    check(text, tmp_path)
    assert "dhcp-range=10.9.0.0,proxy,255.255.0.0" in text
    assert "dhcp-boot=tag:ipxe,http://10.9.0.5:8480/boot.ipxe" in text
    data = cli.json(
        "netboot", "dnsmasq", "--server", "10.9.0.5", "--network", "10.9.0.0/16", "--port", "9000"
    )
    assert data["script_url"] == "http://10.9.0.5:9000/boot.ipxe" and data["config"].startswith("#")
    bad = cli("netboot", "dnsmasq", "--server", "10.9.0.5", "--network", "nonsense", check=False)
    assert bad.code == 2 and bad.err.count("\n") == 1 and "bad network" in bad.err
    # an address of no interface here, and no network: the network cannot be guessed
    guess = cli("netboot", "dnsmasq", "--server", "198.51.100.7", check=False)
    assert guess.code == 2 and "--network" in guess.err
