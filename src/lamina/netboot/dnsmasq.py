"""A proxy-DHCP configuration for dnsmasq: network boot on a network whose own DHCP
server stays as it is (it keeps handing out addresses; dnsmasq only adds boot options).

Two kinds of client ask:

- PXE firmware (legacy BIOS, client architecture 0; UEFI x86-64, 7 or 9) gets an iPXE
  binary over dnsmasq's TFTP: ``undionly.kpxe`` (BIOS, drives the card through the ROM's
  UNDI) or ``snponly.efi`` (UEFI, through the firmware's SNP driver), both in Debian's
  ``ipxe`` package under ``/usr/lib/ipxe``;
- iPXE (it sends DHCP option 175, which ``dhcp-match`` turns into the ``ipxe`` tag),
  whether chainloaded so or built into the card's ROM (as qemu's are), gets the URL of
  lamina's boot script instead, so it never loads itself again.

In proxy mode PXE clients follow ``pxe-service`` entries (a boot menu of one item, taken
at once), not ``dhcp-boot``; both are written for iPXE, which reads either.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import UsageError

TFTP_ROOT = Path("/usr/lib/ipxe")
BIOS_LOADER = "undionly.kpxe"
UEFI_LOADER = "snponly.efi"
# dnsmasq's names for the client architectures (RFC 4578): 0, 7 and 9.
_ARCHES = (("x86PC", BIOS_LOADER), ("BC_EFI", UEFI_LOADER), ("x86-64_EFI", UEFI_LOADER))
_INTERFACE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
# What may appear in a URL inside the configuration (no spaces, quotes or commas).
_URL = re.compile(r"^https?://[A-Za-z0-9._~:/?#\[\]@!$&'()*+;=%-]+$")


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    script_url: str  # lamina's /boot.ipxe as machines reach it
    network: ipaddress.IPv4Network  # the segment the machines boot on
    interface: str | None = None  # listen on this interface only
    tftp_root: Path = TFTP_ROOT

    def __post_init__(self) -> None:
        if not _URL.match(self.script_url) or "," in self.script_url:
            raise UsageError(f"bad boot script URL {self.script_url!r}")
        if self.interface is not None and not _INTERFACE.match(self.interface):
            raise UsageError(f"bad interface name {self.interface!r}")
        if self.network.version != 4:
            raise UsageError("proxy DHCP is IPv4 only (dnsmasq's proxy mode)")


def parse_network(text: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise UsageError(
            f"bad network {text!r}: expected ADDRESS/PREFIX like 192.168.1.0/24"
        ) from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise UsageError("proxy DHCP is IPv4 only (dnsmasq's proxy mode)")
    return network


def render(config: ProxyConfig) -> str:
    """The configuration file's text (``dnsmasq --test -C FILE`` accepts it)."""
    net = config.network
    lines = [
        "# lamina network boot: proxy DHCP beside the network's own DHCP server, which keeps",
        "# handing out addresses; dnsmasq only tells booting machines where to boot from.",
        "# Check with: dnsmasq --test -C FILE",
        "# no DNS: only DHCP and TFTP",
        "port=0",
    ]
    if config.interface:
        lines += [f"interface={config.interface}", "bind-interfaces"]
    lines += [
        f"dhcp-range={net.network_address},proxy,{net.netmask}",
        "log-dhcp",
        "",
        "# iPXE says so with DHCP option 175",
        "dhcp-match=set:ipxe,175",
        "",
        "# PXE firmware (legacy BIOS, UEFI x86-64): load iPXE from dnsmasq's TFTP server",
        "enable-tftp",
        f"tftp-root={config.tftp_root}",
    ]
    for arch, loader in _ARCHES:
        lines.append(f'pxe-service=tag:!ipxe,{arch},"lamina: loading iPXE",{loader}')
    lines += ["", "# iPXE (chainloaded, or in the card's ROM): lamina's boot script"]
    for arch, _loader in _ARCHES:
        lines.append(f'pxe-service=tag:ipxe,{arch},"lamina",{config.script_url}')
    lines.append(f"dhcp-boot=tag:ipxe,{config.script_url}")
    return "\n".join(lines) + "\n"
