"""TLS across a cluster: the folders of one home (one PostgreSQL, one bucket) share one
certificate authority, so one machine credential opens its disk on every block server,
checked with real TLS clients (nbdcopy over nbds://, qemu-io with tls-creds); a folder
with another CA, or none, is refused with how to take the right one."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.trust.authority import Authority
from tests.conftest import Cli, write_sparse
from tests.nbdtools import ok, qemu_io, tls_image
from tests.pg import PgCluster, fresh_database
from tests.servers import Server, member_servers

pytestmark = pytest.mark.peers

MiB = 1 << 20


@pytest.fixture
def shared(s3_env: dict[str, str], pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    url = fresh_database(pg_cluster)
    monkeypatch.setenv("LAMINA_DATABASE_URL", url)
    return url


def ca_copy(home: Path, dest: Path, key_mode: int = 0o600) -> Path:
    """What the admin copies from the first server: its CA certificate and key."""
    dest.mkdir(mode=0o700)
    shutil.copy(home / "tls" / "ca-cert.pem", dest)
    shutil.copy(home / "tls" / "ca-key.pem", dest)
    os.chmod(dest / "ca-key.pem", key_mode)
    return dest


@pytest.fixture
def cluster(shared: str, tmp_path: Path) -> tuple[Cli, Cli]:
    """Two folders of one home: the first made by init (with the CA), the second joined
    with a copy of that CA."""
    a, b = Cli(tmp_path / "a"), Cli(tmp_path / "b")
    a("init")
    assert (a.home / "tls" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    joined = b.json("init", "--join", "--ca", str(ca_copy(a.home, tmp_path / "copy")))
    assert joined["ca_taken"] and joined["id"] == a.json("init")["id"]
    assert (b.home / "tls" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    return a, b


@pytest.fixture
def tls_servers(cluster: tuple[Cli, Cli], tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    with member_servers((cluster[0].home, cluster[1].home), tmp_path, "--tls") as pair:
        yield pair


def nbds(server: Server, export: str, creds: Path) -> str:
    return f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={creds}"


def test_one_machine_credential_opens_its_disk_on_every_server(
    cluster: tuple[Cli, Cli], tls_servers: tuple[Server, Server], tmp_path: Path
) -> None:
    cli_a, cli_b = cluster
    source = write_sparse(
        tmp_path / "base.raw", 8 * MiB, [(0, os.urandom(3 * MiB)), (6 * MiB, b"tls" * 9000)]
    )
    cli_a("image", "import", "base", str(source))
    cli_a("machine", "add", "m1", "--image", "base")  # stateless: any server serves it
    for server in tls_servers:
        server.start()

    creds = tmp_path / "m1-creds"  # issued once, on the first folder
    cli_a("machine", "credentials", "m1", "--out", str(creds))
    for i, server in enumerate(tls_servers):
        out = tmp_path / f"m1-{i}.raw"
        subprocess.run(["nbdcopy", nbds(server, "machine/m1", creds), str(out)], check=True)
        assert out.read_bytes() == source.read_bytes()
        # the credential opens only what is the machine's, on every server alike
        other = subprocess.run(
            ["nbdinfo", nbds(server, "machine/nobody", creds)], capture_output=True, check=False
        )
        assert other.returncode != 0

    # an admin credential issued on the joined folder opens the first server's exports
    admin = tmp_path / "admin-creds"
    cli_b("admin", "credentials", "--out", str(admin))
    a, _ = tls_servers
    read = ok(qemu_io(tls_image(a.port, "base"), "read -v 0x600000 3", read_only=True, tls=admin))
    assert "74 6c 73" in read  # "tls"

    # without a credential nothing opens: TLS is really asked for
    bare = subprocess.run(
        ["nbdinfo", f"nbds://127.0.0.1:{a.port}/machine/m1?tls-verify-peer=false"],
        capture_output=True,
        check=False,
    )
    assert bare.returncode != 0


def test_a_folder_without_the_cluster_ca_is_refused(
    cluster: tuple[Cli, Cli], tmp_path: Path
) -> None:
    cli_a, _ = cluster
    cli_a("image", "import", "base", str(write_sparse(tmp_path / "s.raw", MiB, [])))
    cli_a("machine", "add", "m1", "--image", "base")

    # joined without --ca: it issues nothing and serves no TLS, and says what to do
    c = Cli(tmp_path / "c")
    c("init", "--join")
    refused = c("machine", "credentials", "m1", "--out", str(tmp_path / "c-creds"), check=False)
    assert refused.code == 5 and "lamina init --ca DIR" in refused.err, refused.err
    assert not (tmp_path / "c-creds").exists()
    served = Server(c.home, tmp_path / "serve-c.log", args=("--tls",))
    with pytest.raises(AssertionError, match="exited with 5"):
        served.start()
    assert "share the certificate authority" in served.log.read_text()

    # another CA, a copy whose key others may read, and a folder with no CA are refused
    foreign = Authority.open(tmp_path / "foreign").directory
    for source, said in (
        (foreign, "not the one this home's folders share"),
        (ca_copy(cli_a.home, tmp_path / "loose", key_mode=0o644), "chmod 600"),
        (tmp_path, "no certificate authority to take"),
    ):
        wrong = c("init", "--ca", str(source), check=False)
        assert wrong.code == 5 and said in wrong.err, wrong.err
        assert not (c.home / "tls" / "ca-cert.pem").exists()

    # the right copy, taken on the folder made before, and it issues credentials
    taken = c.json("init", "--ca", str(ca_copy(cli_a.home, tmp_path / "right")))
    assert taken["ca_taken"] and not taken["created"]
    c("machine", "credentials", "m1", "--out", str(tmp_path / "c-creds"))
    issued = (tmp_path / "c-creds" / "ca-cert.pem").read_bytes()
    assert issued == (cli_a.home / "tls" / "ca-cert.pem").read_bytes()
