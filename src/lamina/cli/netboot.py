"""lamina netboot dnsmasq"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from lamina.cli.common import JsonOpt, emit_json, out
from lamina.errors import UsageError

app = typer.Typer(help="Network boot (PXE, iPXE) of machines without a disk.", no_args_is_help=True)


def local_interfaces() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """This host's IPv4 addresses with their networks and interfaces (``ip -j addr``)."""
    exe = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if exe is None:
        return []
    proc = subprocess.run(
        [exe, "-j", "-4", "addr", "show"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return []
    found = []
    for link in json.loads(proc.stdout or "[]"):
        for addr in link.get("addr_info", []):
            iface = ipaddress.IPv4Interface(f"{addr['local']}/{addr['prefixlen']}")
            if not iface.ip.is_loopback:
                found.append((str(link["ifname"]), iface))
    return found


def _server_and_network(
    server: str | None, network: str | None
) -> tuple[str, ipaddress.IPv4Network, str | None]:
    """The server's address, the boot network and its interface, from what was given and
    this host's addresses (the server's own network when --network is left out)."""
    from lamina.netboot.dnsmasq import parse_network

    interfaces = local_interfaces()
    net = parse_network(network) if network else None
    if server is None:
        mine = [(n, i) for n, i in interfaces if net is None or i.ip in net]
        if len(mine) != 1:
            raise UsageError(
                "give --server ADDRESS (where the machines reach lamina serve): this host has "
                + (f"{len(mine)} addresses" + (f" in {net}" if net else ""))
            )
        return str(mine[0][1].ip), net or mine[0][1].network, mine[0][0]
    try:
        address = ipaddress.ip_address(server)
    except ValueError:
        address = None  # a host name: the network must be given
    here = [(n, i) for n, i in interfaces if address is not None and i.ip == address]
    if net is None:
        if not here:
            raise UsageError(
                f"give --network ADDRESS/PREFIX: {server} is not an address of this host"
            )
        net = here[0][1].network
    return server, net, here[0][0] if here else None


def dnsmasq(
    server: Annotated[
        str | None,
        typer.Option("--server", help="Address the machines reach lamina serve at [this host's]."),
    ] = None,
    port: Annotated[int, typer.Option("--port", help="lamina serve's HTTP port.")] = 8480,
    network: Annotated[
        str | None,
        typer.Option(
            "--network", help="Network the machines boot on, ADDRESS/PREFIX [the server's]."
        ),
    ] = None,
    interface: Annotated[
        str | None, typer.Option("--interface", help="Answer on this interface only.")
    ] = None,
    tftp_root: Annotated[
        Path, typer.Option("--tftp-root", help="Folder of undionly.kpxe and snponly.efi.")
    ] = Path("/usr/lib/ipxe"),
    url: Annotated[
        str | None,
        typer.Option("--url", help="The boot script's whole URL [http://SERVER:PORT/boot.ipxe]."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a proxy-DHCP configuration for dnsmasq (the network's DHCP server stays).

    Example: lamina netboot dnsmasq > /etc/dnsmasq.d/lamina.conf
    """
    from lamina.netboot.dnsmasq import ProxyConfig, render

    host, net, found_interface = _server_and_network(server, network)
    if not 0 < port < 65536:
        raise UsageError(f"bad --port {port}")
    shown = f"[{host}]" if ":" in host else host
    config = ProxyConfig(
        script_url=url or f"http://{shown}:{port}/boot.ipxe",
        network=net,
        interface=interface or (found_interface if server is None else None),
        tftp_root=tftp_root,
    )
    text = render(config)
    if as_json:
        emit_json(
            {
                "script_url": config.script_url,
                "network": str(config.network),
                "interface": config.interface,
                "tftp_root": str(config.tftp_root),
                "config": text,
            }
        )
    else:
        out.print(text, end="", markup=False, soft_wrap=True)


app.command("dnsmasq")(dnsmasq)
