"""lamina machine libvirt | machine qemu: the domain is defined by libvirt (its test
driver) and valid against libvirt's schema; the qemu command line, run as printed, opens
the machine's disk and seed from a real lamina serve, over TLS with the machine's
credential, and the server refuses it without."""

from __future__ import annotations

import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.servers import Server


@pytest.fixture
def machine(cli: Cli, tmp_path: Path) -> dict[str, str]:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x55\xaa" * 256)
    os.truncate(disk, 4 << 20)
    cli("image", "import", "base", str(disk))
    added: dict[str, str] = cli.json("machine", "add", "desk-1", "--image", "base")
    return added


def test_libvirt_defines_the_domain(cli: Cli, machine: dict[str, str], tmp_path: Path) -> None:
    text = cli("machine", "libvirt", "desk-1", "--server", "lamina.example:10809", "--tls").out
    path = tmp_path / "desk-1.xml"
    path.write_text(text)
    valid = subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, check=False
    )
    assert valid.returncode == 0, valid.stderr
    defined = subprocess.run(
        ["virsh", "-c", "test:///default", f"define {path}; dumpxml desk-1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert defined.returncode == 0, defined.stderr
    domain = ET.fromstring(defined.stdout.split("\n", 2)[2])  # past "Domain ... defined"
    disks = domain.findall("devices/disk/source")
    assert [d.get("name") for d in disks] == ["machine/desk-1", "machine/desk-1/seed"]
    assert {d.get("tls") for d in disks} == {"yes"}
    assert {
        (h.get("name"), h.get("port")) for h in domain.iterfind("devices/disk/source/host")
    } == {("lamina.example", "10809")}
    assert domain.find("devices/disk[2]/readonly") is not None
    assert domain.find("devices/interface/mac").get("address") == machine["mac"]  # type: ignore[union-attr]


def test_tls_follows_the_server(
    cli: Cli, machine: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loopback without --tls: plain NBD; an address that is not loopback: TLS; with no
    --server, the configured serve.nbd, serve.tls and serve.insecure decide."""
    assert "tls=" not in cli("machine", "libvirt", "desk-1", "--server", "127.0.0.1:10809").out
    assert 'tls="yes"' in cli("machine", "libvirt", "desk-1", "--server", "10.1.2.3:10809").out
    refused = cli("machine", "qemu", "desk-1", "--server", "10.1.2.3:10809", check=False)
    assert refused.code == 2 and "--credentials DIR" in refused.err
    monkeypatch.setenv("LAMINA_SERVE__NBD", "0.0.0.0:10999")
    wild = cli("machine", "libvirt", "desk-1").out
    assert 'port="10999"' in wild and 'tls="yes"' in wild
    monkeypatch.setenv("LAMINA_SERVE__INSECURE", "true")
    assert "tls=" not in cli("machine", "libvirt", "desk-1").out
    monkeypatch.setenv("LAMINA_SERVE__NBD", "127.0.0.1:10999")
    monkeypatch.setenv("LAMINA_SERVE__TLS", "true")
    monkeypatch.delenv("LAMINA_SERVE__INSECURE")
    assert 'tls="yes"' in cli("machine", "libvirt", "desk-1").out
    missing = cli("machine", "libvirt", "nope", check=False)
    assert missing.code == 3 and missing.err == "lamina: no machine named 'nope'\n"


def run_qemu(argv: list[str], seconds: float) -> tuple[bool, str]:
    """Whether qemu still runs after ``seconds`` (it opened its disks), and its stderr."""
    argv = [a.replace("accel=kvm:tcg", "accel=tcg") for a in argv]  # no KVM here
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True, ""
    assert proc.stderr is not None
    return False, proc.stderr.read()


@pytest.mark.peers
def test_qemu_opens_the_disks_over_tls(
    cli: Cli, machine: dict[str, str], server: Server, tmp_path: Path
) -> None:
    server.args = ("--tls",)
    server.start()
    where = f"127.0.0.1:{server.port}"
    creds = tmp_path / "creds"
    cli("machine", "credentials", "desk-1", "--out", str(creds))
    argv = cli.json("machine", "qemu", "desk-1", "--server", where, "--credentials", str(creds))
    assert argv[0] == "qemu-system-x86_64" and f"mac={machine['mac']}" in argv[-1]
    running, err = run_qemu(argv, 4.0)
    assert running, err  # a disk it cannot open stops qemu at once
    plain = cli.json("machine", "qemu", "desk-1", "--server", where, "--no-tls")
    running, err = run_qemu(plain, 30.0)
    assert not running and "TLS" in err  # the control: the server wants TLS


@pytest.mark.peers
def test_qemu_printed_for_a_shell(cli: Cli, machine: dict[str, str], server: Server) -> None:
    server.start()
    text = cli("machine", "qemu", "desk-1", "--server", f"127.0.0.1:{server.port}").out
    assert text.startswith("qemu-system-x86_64 \\\n    -machine q35,accel=kvm:tcg \\\n")
    command = text.replace("accel=kvm:tcg", "accel=tcg")
    proc = subprocess.Popen(["sh", "-c", f"exec {command}"], stdout=subprocess.DEVNULL)
    time.sleep(3)
    assert proc.poll() is None  # the shell took the line whole and qemu opened both disks
    proc.kill()
    proc.wait()
