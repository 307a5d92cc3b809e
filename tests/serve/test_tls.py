"""`lamina serve --tls` with real TLS clients: qemu-img and qemu-io (tls-creds-x509),
nbdinfo and nbdcopy (nbds:// URIs, libnbd), raw sockets for what no client would send."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.home import Home
from lamina.nbd import Opt, Rep
from lamina.nbd.client import ClientConnection
from lamina.trust.authority import CA_CERT, CLIENT_CERT, CLIENT_KEY, Authority
from tests.conftest import Cli, write_sparse
from tests.nbdtools import ok, qemu_io, tls_image, tls_object
from tests.servers import Server, wait_for

MiB = 1 << 20


@pytest.fixture
def disk(cli: Cli, tmp_path: Path) -> Path:
    src = write_sparse(
        tmp_path / "base.raw", 8 * MiB, [(0, os.urandom(MiB)), (5 * MiB, b"x" * 4096)]
    )
    cli("image", "import", "base", str(src))
    cli("machine", "add", "m1", "--image", "base", "--mode", "stateful")
    cli("machine", "add", "m2", "--image", "base", "--mode", "stateful")
    return src


@pytest.fixture
def tls_server(cli: Cli, tmp_path: Path) -> Iterator[Server]:
    srv = Server(cli.home, tmp_path / "serve.log", args=("--tls",))
    yield srv
    srv.stop()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def credentials(cli: Cli, srv: Server, out: Path, machine: str | None, *more: str) -> Path:
    who = ["machine", "credentials", machine] if machine else ["admin", "credentials"]
    cli(*who, "--out", str(out), "--server", f"127.0.0.1:{srv.port}", *more)
    return out


def info(srv: Server, export: str, creds: Path) -> subprocess.CompletedProcess[str]:
    image = tls_image(srv.port, export)
    return run("qemu-img", "info", "--output=json", *tls_object(creds), "--image-opts", image)


def nbds(srv: Server, export: str, creds: Path) -> str:
    return f"nbds://127.0.0.1:{srv.port}/{export}?tls-certificates={creds}"


def listed(srv: Server, creds: Path) -> set[str]:
    out = subprocess.run(
        ["nbdinfo", "--list", "--json", nbds(srv, "", creds)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    return {e["export-name"] for e in json.loads(out)["exports"]}


def test_a_machine_credential_opens_its_disk_seed_and_version_only(
    cli: Cli, tls_server: Server, disk: Path, tmp_path: Path
) -> None:
    tls_server.start()
    m1 = credentials(cli, tls_server, tmp_path / "m1", "m1")
    assert {p.name for p in m1.iterdir()} == {CA_CERT, CLIENT_CERT, CLIENT_KEY}
    assert (m1 / CLIENT_KEY).stat().st_mode & 0o777 == 0o600

    ok(qemu_io(tls_image(tls_server.port, "machine/m1"), "write -P 0x5a 0 65536", tls=m1))
    ok(qemu_io(tls_image(tls_server.port, "machine/m1"), "read -P 0x5a 0 65536", tls=m1))
    seed = json.loads(info(tls_server, "machine/m1/seed", m1).stdout)
    assert seed["virtual-size"] > 0
    copy = tmp_path / "copy.raw"
    subprocess.run(["nbdcopy", nbds(tls_server, "base@1", m1), str(copy)], check=True)
    assert copy.read_bytes() == disk.read_bytes()
    assert listed(tls_server, m1) == {"base", "base@1", "machine/m1", "machine/m1/seed"}


def test_machine_a_credential_is_refused_on_machine_b(
    cli: Cli, tls_server: Server, disk: Path, tmp_path: Path
) -> None:
    tls_server.start()
    m1 = credentials(cli, tls_server, tmp_path / "m1", "m1")
    for export in ("machine/m2", "machine/m2/seed"):
        proc = info(tls_server, export, m1)
        assert proc.returncode != 0
        assert f"'{export}' is not open to the credential of machine m1" in proc.stderr
        nbd = run("nbdinfo", nbds(tls_server, export, m1))
        assert nbd.returncode != 0
    # a write through the refused route never reached machine m2's delta
    admin = credentials(cli, tls_server, tmp_path / "admin", None)
    out = ok(qemu_io(tls_image(tls_server.port, "machine/m2"), "read -v 0 16", tls=admin))
    assert out.split()[1:5] == [f"{b:02x}" for b in disk.read_bytes()[:4]]
    wait_for(
        lambda: any('"refused"' in ln and "machine m1" in ln for ln in tls_server.log_lines()), 10
    )


def test_an_admin_credential_opens_every_export(
    cli: Cli, tls_server: Server, disk: Path, tmp_path: Path
) -> None:
    tls_server.start()
    admin = credentials(cli, tls_server, tmp_path / "admin", None)
    names = {"base", "base@1", "machine/m1", "machine/m1/seed", "machine/m2", "machine/m2/seed"}
    assert listed(tls_server, admin) == names
    ok(qemu_io(tls_image(tls_server.port, "machine/m2"), "write -P 7 4096 4096", tls=admin))


def test_a_repin_moves_what_a_machine_may_open(
    cli: Cli, tls_server: Server, disk: Path, tmp_path: Path
) -> None:
    v2 = tmp_path / "v2.raw"
    v2.write_bytes(disk.read_bytes())
    with open(v2, "r+b") as f:
        f.write(b"v2")
    cli("image", "import", "base", str(v2))  # base@2
    tls_server.start()
    m1 = credentials(cli, tls_server, tmp_path / "m1", "m1")
    # pinned to base@1 (the newest when it was added): base means base@2 now
    assert listed(tls_server, m1) == {"base@1", "machine/m1", "machine/m1/seed"}
    assert info(tls_server, "base@2", m1).returncode != 0
    cli("machine", "set", "m1", "--image", "base@2")
    assert listed(tls_server, m1) == {"base", "base@2", "machine/m1", "machine/m1/seed"}


def test_plain_nbd_is_refused_when_tls_is_required(tls_server: Server, disk: Path) -> None:
    tls_server.start()
    proc = run("qemu-img", "info", tls_server.url("machine/m1"))
    assert proc.returncode != 0 and "TLS negotiation required" in proc.stderr
    assert run("nbdinfo", "--list", tls_server.url("")).returncode

    # What a plain client may still do: be told TLS first, abort; NBD_OPT_EXPORT_NAME,
    # which cannot be refused politely, ends the connection.
    client = ClientConnection()
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        sock.recv(18)
        sock.sendall(client.client_flags() + client.option(Opt.LIST))
        head = sock.recv(20)
        assert struct.unpack(">QIII", head)[1:3] == (Opt.LIST, Rep.ERR_TLS_REQD)
        sock.recv(struct.unpack(">I", head[16:])[0])
        sock.sendall(client.option(Opt.EXPORT_NAME, b"machine/m1"))
        assert sock.recv(100) == b""  # hung up


def test_a_client_without_a_certificate_opens_nothing(
    cli: Cli, tls_server: Server, disk: Path, tmp_path: Path
) -> None:
    tls_server.start()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / CA_CERT).write_bytes((cli.home / "tls" / CA_CERT).read_bytes())
    proc = info(tls_server, "base", bare)
    assert proc.returncode != 0 and "requires a client certificate" in proc.stderr
    assert listed(tls_server, bare) == set()


def test_a_wrong_ca_is_refused_both_ways(
    cli: Cli, tls_server: Server, disk: Path, tmp_path: Path
) -> None:
    tls_server.start()
    m1 = credentials(cli, tls_server, tmp_path / "m1", "m1")
    stranger = Authority.open(tmp_path / "other-ca")
    # the client trusts another CA: it refuses the server
    distrust = tmp_path / "distrust"
    distrust.mkdir()
    for name in (CLIENT_CERT, CLIENT_KEY):
        (distrust / name).write_bytes((m1 / name).read_bytes())
    (distrust / CA_CERT).write_bytes(stranger.cert_pem)
    proc = info(tls_server, "machine/m1", distrust)
    assert proc.returncode != 0 and "certificate" in proc.stderr.lower()
    # the client's certificate comes from another CA: the server refuses it
    forged = tmp_path / "forged"
    from lamina.cli.credentials import write

    issued = stranger.issue_client("machine", "m1")
    write(forged, stranger.cert_pem, issued)
    (forged / CA_CERT).write_bytes((m1 / CA_CERT).read_bytes())
    assert info(tls_server, "machine/m1", forged).returncode != 0  # qemu checks its own first
    refused_by_server(tls_server, forged)


def refused_by_server(srv: Server, creds: Path) -> None:
    """libnbd sends whatever certificate it is given (qemu checks its own against its CA
    first and never connects): the server's handshake must refuse it."""
    before = sum('"tls-refused"' in line for line in srv.log_lines())
    proc = run("nbdinfo", nbds(srv, "machine/m1", creds))
    assert proc.returncode != 0
    wait_for(lambda: sum('"tls-refused"' in ln for ln in srv.log_lines()) == before + 1, 10)


def test_an_expired_credential_is_refused(
    cli: Cli, home: Home, tls_server: Server, disk: Path, tmp_path: Path
) -> None:
    from lamina.cli.credentials import write
    from lamina.manager.services import credentials as creds
    from lamina.trust.principal import Kind

    tls_server.start()
    ca = Authority.open(home.tls_dir)
    ended = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    with home.session() as session:
        issued = creds.issue(session, ca, Kind.MACHINE, "m1", not_after=ended)
    write(tmp_path / "old", ca.cert_pem, issued)
    assert info(tls_server, "machine/m1", tmp_path / "old").returncode != 0
    refused_by_server(tls_server, tmp_path / "old")


def test_a_rotated_credential_is_refused(
    cli: Cli, tls_server: Server, disk: Path, tmp_path: Path
) -> None:
    tls_server.start()
    first = credentials(cli, tls_server, tmp_path / "first", "m1")
    kept = tmp_path / "kept"
    kept.mkdir()
    for item in first.iterdir():
        (kept / item.name).write_bytes(item.read_bytes())
    assert info(tls_server, "machine/m1", kept).returncode == 0
    credentials(cli, tls_server, first, "m1", "--rotate")
    proc = info(tls_server, "machine/m1", kept)
    assert proc.returncode != 0 and "revoked" in proc.stderr
    assert info(tls_server, "machine/m1", first).returncode == 0
    # the same for the admin
    admin = credentials(cli, tls_server, tmp_path / "admin", None)
    old_admin = (admin / CLIENT_CERT).read_bytes(), (admin / CLIENT_KEY).read_bytes()
    credentials(cli, tls_server, tmp_path / "admin2", None, "--rotate")
    (admin / CLIENT_CERT).write_bytes(old_admin[0])
    (admin / CLIENT_KEY).write_bytes(old_admin[1])
    assert "revoked" in info(tls_server, "base", admin).stderr


def test_the_server_certificate_names_every_address(cli: Cli, tmp_path: Path, disk: Path) -> None:
    from cryptography import x509

    srv = Server(cli.home, tmp_path / "serve.log", args=("--tls", "--tls-name", "boot.example"))
    try:
        srv.start()
        cert = x509.load_pem_x509_certificate((cli.home / "tls" / "server-cert.pem").read_bytes())
    finally:
        srv.stop()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "::1"} <= ips
    assert {"boot.example", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))


@pytest.mark.parametrize(
    ("hosts", "tls", "insecure", "expected"),
    [
        (["127.0.0.1", "127.0.0.1"], False, False, False),  # loopback: plain by default
        (["::1", "localhost"], False, False, False),
        (["0.0.0.0", "127.0.0.1"], False, False, True),  # any other address: TLS
        (["10.0.0.5"], False, False, True),
        (["10.0.0.5"], False, True, False),  # unless --insecure
        (["127.0.0.1"], True, False, True),  # --tls on loopback too
    ],
)
def test_tls_is_the_default_off_loopback(
    hosts: list[str], tls: bool, insecure: bool, expected: bool
) -> None:
    from lamina.serve.tls import want_tls

    assert want_tls(hosts, tls=tls, insecure=insecure) is expected


def test_tls_and_insecure_together_is_a_usage_error(cli: Cli) -> None:
    result = cli("serve", "--tls", "--insecure", check=False)
    assert result.code == 2 and "contradict" in result.err


def test_the_printed_qemu_and_libnbd_lines_work_as_they_are(
    cli: Cli, tls_server: Server, disk: Path, tmp_path: Path
) -> None:
    tls_server.start()
    out = tmp_path / "m1"
    printed = cli.json(
        "machine",
        "credentials",
        "m1",
        "--out",
        str(out),
        "--server",
        f"127.0.0.1:{tls_server.port}",
    )
    assert printed["holder"] == "machine m1" and printed["dir"] == str(out)
    assert "<source protocol='nbd' name='machine/m1' tls='yes'>" in printed["libvirt"][0]
    for uri in printed["nbd_uris"]:
        run_ok = run("nbdinfo", "--size", uri)
        assert run_ok.returncode == 0, run_ok.stderr

    # qemu opens both disks with the printed arguments (-S: no guest runs)
    def opened() -> list[str]:
        lines = tls_server.log_lines()
        return [json.loads(ln)["export"] for ln in lines if '"connect"' in ln]

    before = len(opened())
    vm = subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", "-machine",
         "pc,accel=tcg", *printed["qemu"]],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: sorted(opened()[before:]) == ["machine/m1", "machine/m1/seed"], 30)
    finally:
        vm.kill()
        vm.wait()
