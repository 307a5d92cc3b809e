"""Network boot when NBD requires TLS: the boot routes on a plain-HTTP port of their own,
a one-hour machine credential per boot as a second initrd, checked with libnbd's nbdinfo
(it opens that machine's disk, not another's); --boot-allow; and a diskless VM booting
over TLS with it."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from lamina.demo.image import DemoImage
from lamina.demo.pxe import HOST_FROM_GUEST, PxeVm
from lamina.netboot import tlsfiles
from tests.conftest import Cli
from tests.servers import Server, free_port

MAC = "52:54:00:40:00:01"


@pytest.fixture
def boot_port() -> int:
    return free_port()


@pytest.fixture
def tls_fleet(cli: Cli, demo: DemoImage) -> None:
    cli("image", "import", "demo", str(demo.path))
    cli("machine", "add", "desk-001", "--image", "demo", "--mac", MAC)
    cli("machine", "add", "desk-002", "--image", "demo", "--mac", "52:54:00:40:00:02")


def unpack(archive: bytes, into: Path) -> Path:
    into.mkdir()
    subprocess.run(
        ["busybox", "cpio", "-id"], input=archive, cwd=into, check=True, capture_output=True
    )
    return into / tlsfiles.TLS_DIR


def nbdinfo(server: Server, export: str, creds: Path) -> subprocess.CompletedProcess[str]:
    url = f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={creds}"
    return subprocess.run(["nbdinfo", url], capture_output=True, text=True, timeout=60, check=False)


def test_a_booting_machine_gets_a_short_lived_credential_for_its_own_disk(
    cli: Cli, tls_fleet: None, tmp_path: Path, boot_port: int
) -> None:
    server = Server(
        cli.home, tmp_path / "serve.log", args=("--tls", "--boot-http", f"127.0.0.1:{boot_port}")
    )
    server.start()
    try:
        boot = f"http://127.0.0.1:{boot_port}"
        assert httpx.get(f"{boot}/boot.ipxe").text.startswith("#!ipxe")  # plain HTTP
        script = httpx.get(f"{boot}/boot/{MAC.replace(':', '%3A')}.ipxe").text
        kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
        assert "initrd=initrd.img initrd=credential.cpio" in kernel and "lamina.tls=1" in kernel
        assert f"initrd {boot}/boot/52-54-00-40-00-01/demo/1/credential.cpio" in script
        assert httpx.get(f"{boot}/api/v1/health").status_code == 404  # network boot only

        got = httpx.get(f"{boot}/boot/52-54-00-40-00-01/demo/1/credential.cpio")
        assert got.status_code == 200 and got.headers["cache-control"] == "no-store"
        creds = unpack(got.content, tmp_path / "initrd")
        assert (creds / tlsfiles.KEY).stat().st_mode & 0o777 == 0o600
        cert = x509.load_pem_x509_certificate((creds / tlsfiles.CERT).read_bytes())
        lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
        assert dt.timedelta(minutes=50) < lifetime <= tlsfiles.VALIDITY
        assert nbdinfo(server, "machine/desk-001", creds).returncode == 0
        assert nbdinfo(server, "machine/desk-001/seed", creds).returncode == 0
        refused = nbdinfo(server, "machine/desk-002", creds)
        assert refused.returncode != 0
        assert httpx.get(f"{boot}/boot/52-54-00-40-00-09/demo/1/credential.cpio").status_code == 404
        assert any('"netboot-credential"' in line for line in server.log_lines())
    finally:
        server.stop()


def test_without_tls_there_is_no_credential_and_boot_allow_limits_who_boots(
    cli: Cli, tls_fleet: None, tmp_path: Path
) -> None:
    server = Server(cli.home, tmp_path / "serve.log")
    server.start()
    try:
        got = httpx.get(f"{server.http_url}/boot/52-54-00-40-00-01/demo/1/credential.cpio")
        assert got.status_code == 404 and "without TLS" in got.text
        kernel = next(
            line
            for line in httpx.get(f"{server.http_url}/boot/{MAC}.ipxe").text.splitlines()
            if line.startswith("kernel ")
        )
        assert "credential" not in kernel and "lamina.tls" not in kernel
    finally:
        server.stop()
    fenced = Server(cli.home, tmp_path / "fenced.log", args=("--boot-allow", "10.0.0.0/8"))
    fenced.start()
    try:
        assert httpx.get(f"{fenced.http_url}/boot.ipxe").status_code == 403
        assert httpx.get(f"{fenced.http_url}/api/v1/health").status_code == 200
    finally:
        fenced.stop()
    bad = cli("serve", "--boot-allow", "nonsense", check=False)
    assert bad.code == 2 and "--boot-allow" in bad.err


@pytest.mark.e2e  # boots a VM under TCG: in make e2e, beside the other VM runs
@pytest.mark.peers
@pytest.mark.slow
def test_a_diskless_machine_boots_over_tls(
    cli: Cli, tls_fleet: None, tmp_path: Path, boot_port: int
) -> None:
    server = Server(
        cli.home,
        tmp_path / "serve.log",
        args=("--tls", "--tls-name", HOST_FROM_GUEST, "--boot-http", f"127.0.0.1:{boot_port}"),
    )
    server.start()
    try:
        with PxeVm("desk-001", MAC, tmp_path, f"http://{HOST_FROM_GUEST}:{boot_port}") as vm:
            report = vm.wait()
        assert report.hostname == "desk-001"
        connects = [line for line in server.log_lines() if '"event": "connect"' in line]
        assert len(connects) == 2
        assert all('"credential": "machine desk-001"' in line for line in connects)
    finally:
        server.stop()
