"""What a hypervisor needs to run a machine from lamina: a libvirt domain and a qemu
command line, each with the machine's disk (``machine/NAME``, writable) and seed
(``machine/NAME/seed``, read-only) over NBD, its MAC, and TLS when the server uses it.

One function per front end's need (the CLI prints them, the console shows the domain).
With TLS, qemu reads a client credential from a folder (``lamina machine credentials NAME
--out DIR``); libvirt reads one from qemu.conf's ``nbd_tls_x509_cert_dir`` for every
domain of its host, which the domain's comment says.
"""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import UsageError

# 2 GiB and 2 vCPUs: a desktop guest's floor; --memory/--vcpus change them.
MEMORY_MIB = 2048
VCPUS = 2
# What the wildcard addresses are reached as: this host's name.
_WILDCARDS = {"", "0.0.0.0", "::"}


@dataclass(frozen=True)
class Endpoint:
    """Where the hypervisor reaches ``lamina serve``'s NBD listener, and how."""

    host: str
    port: int
    tls: bool

    @classmethod
    def of(cls, address: str, *, tls: bool | None, server_tls: bool) -> Endpoint:
        """``address`` (HOST:PORT) as a client dials it: a wildcard bind becomes this
        host's name. TLS as asked, else as the server does it."""
        host, sep, port_text = address.rpartition(":")
        if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UsageError(f"bad --server address {address!r}: expected HOST:PORT")
        host, port = host.strip("[]"), int(port_text)
        if host in _WILDCARDS:
            host = socket.getfqdn()
        return cls(host, port, server_tls if tls is None else tls)


def endpoint(server: str | None = None, *, tls: bool | None = None) -> Endpoint:
    """Where this installation's block server is dialled: ``server`` (HOST:PORT), else
    serve.nbd of the configuration. TLS as asked, else as ``lamina serve`` decides it with
    the same configuration: with serve.tls, or on an address that is not loopback unless
    serve.insecure."""
    from lamina.settings import load
    from lamina.trust.addresses import is_loopback

    serve = load().serve
    address = server or serve.nbd
    host = address.rpartition(":")[0].strip("[]") or "0.0.0.0"
    server_tls = serve.tls or (not serve.insecure and not is_loopback(host))
    return Endpoint.of(address, tls=tls, server_tls=server_tls)


@dataclass(frozen=True)
class Guest:
    name: str
    mac: str
    memory_mib: int = MEMORY_MIB
    vcpus: int = VCPUS

    def __post_init__(self) -> None:
        if self.memory_mib < 64 or self.vcpus < 1:
            raise UsageError("--memory must be at least 64 (MiB) and --vcpus at least 1")

    @property
    def exports(self) -> tuple[str, str]:
        return f"machine/{self.name}", f"machine/{self.name}/seed"


def libvirt_domain(guest: Guest, nbd: Endpoint, *, network: str = "default") -> str:
    """A domain XML libvirt defines as it is (``virsh define``): the disk boots first,
    the seed is a read-only second disk, the NIC has the machine's MAC."""
    domain = ET.Element("domain", type="kvm")
    ET.SubElement(domain, "name").text = guest.name
    ET.SubElement(domain, "memory", unit="MiB").text = str(guest.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(guest.vcpus)
    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "boot", dev="hd")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    devices = ET.SubElement(domain, "devices")
    for i, export in enumerate(guest.exports):
        _disk(devices, export, f"vd{'ab'[i]}", nbd, readonly=i == 1)
    nic = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(nic, "mac", address=guest.mac)
    ET.SubElement(nic, "source", network=network)
    ET.SubElement(nic, "model", type="virtio")
    ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(devices, "console", type="pty")
    ET.indent(domain)
    note = f"lamina machine {guest.name}: disk and seed over NBD from {nbd.host}:{nbd.port}"
    if nbd.tls:
        note += (
            ", over TLS with the client credential in qemu.conf's nbd_tls_x509_cert_dir"
            " (written there by: lamina machine credentials NAME, option out)"
        )
    # An XML comment may not hold two hyphens in a row (a name may).
    note = f"<!-- {note.replace('--', '- -')} -->"
    return note + "\n" + ET.tostring(domain, encoding="unicode") + "\n"


def _disk(parent: ET.Element, export: str, dev: str, nbd: Endpoint, *, readonly: bool) -> None:
    disk = ET.SubElement(parent, "disk", type="network", device="disk")
    # Raw over NBD; no host page cache: lamina's server is the disk's one cache.
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none")
    source = ET.SubElement(disk, "source", protocol="nbd", name=export)
    if nbd.tls:
        source.set("tls", "yes")
    ET.SubElement(source, "host", name=nbd.host, port=str(nbd.port))
    ET.SubElement(disk, "target", dev=dev, bus="virtio")
    if readonly:
        ET.SubElement(disk, "readonly")


def qemu_argv(
    guest: Guest,
    nbd: Endpoint,
    *,
    credentials: Path | None = None,
    qemu: str = "qemu-system-x86_64",
    accel: str = "kvm:tcg",
) -> list[str]:
    """The qemu command line: two NBD block devices (the seed read-only), the disk boots,
    a virtio NIC with the machine's MAC on user networking (replace with a bridge or tap
    for a real network), serial console on stdio."""
    if nbd.tls and credentials is None:
        raise UsageError(
            "the server uses TLS: give --credentials DIR (lamina machine credentials NAME"
            " --out DIR), or --no-tls for a server started with --insecure"
        )
    args = [qemu, "-machine", f"q35,accel={accel}", "-m", str(guest.memory_mib)]
    args += ["-smp", str(guest.vcpus), "-name", guest.name, "-nodefaults"]
    args += ["-display", "none", "-serial", "stdio"]
    tls = ""
    if nbd.tls:
        args += ["-object", f"tls-creds-x509,id=tls0,dir={credentials},endpoint=client"]
        tls = ",tls-creds=tls0"
    for i, export in enumerate(guest.exports):
        node = ("disk", "seed")[i]
        blockdev = (
            f"driver=nbd,server.type=inet,server.host={nbd.host},server.port={nbd.port},"
            f"export={export}{tls},node-name={node}" + (",read-only=on" if i else "")
        )
        args += ["-blockdev", blockdev, "-device", f"virtio-blk-pci,drive={node}"]
        if not i:
            args[-1] += ",bootindex=0"
    args += ["-netdev", "user,id=net0", "-device", f"virtio-net-pci,netdev=net0,mac={guest.mac}"]
    return args
