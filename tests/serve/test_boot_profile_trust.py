"""Boot profiles come from the machine itself: with TLS, reads of `machine/NAME` through
another credential (an admin's backup) record nothing; the machine's own boot does."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx

from lamina.trust.authority import CA_CERT
from tests.conftest import Cli
from tests.nbdtools import ok, qemu_io, tls_image
from tests.serve.test_tls import credentials, disk, tls_server
from tests.servers import Server, wait_for

__all__ = ["disk", "tls_server"]  # fixtures


def _boots(server: Server, cli: Cli) -> int:
    admin = cli("admin", "token").out.strip()
    answer = httpx.get(
        f"{server.http_url}/api/v1/images/base/versions/1/profile",
        headers={"Authorization": f"Bearer {admin}"},
        verify=ssl.create_default_context(cafile=cli.home / "tls" / CA_CERT),
    )
    assert answer.status_code == 200, answer.text
    return int(answer.json()["boots"])


def test_only_the_machines_own_credential_records_its_boot_profile(
    cli: Cli, tls_server: Server, disk: Path, tmp_path: Path
) -> None:
    tls_server.start()
    admin = credentials(cli, tls_server, tmp_path / "admin", None)
    m1 = credentials(cli, tls_server, tmp_path / "m1", "m1")
    reads = ("read 1048576 4096", "read 0 4096", "read 5242880 4096")
    ok(qemu_io(tls_image(tls_server.port, "machine/m1"), *reads, tls=admin))
    time.sleep(1.5)  # a profile is saved on a thread of its own once the export closes
    assert _boots(tls_server, cli) == 0
    ok(qemu_io(tls_image(tls_server.port, "machine/m1"), *reads, tls=m1))
    wait_for(lambda: _boots(tls_server, cli) == 1, 10)
