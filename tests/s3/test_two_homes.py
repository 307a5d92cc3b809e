"""Two block servers on two homes over one PostgreSQL and one RADOS Gateway bucket: both
serve the same image to real NBD clients; one killed, its stateless machine is served by
the other; a chunk corrupted in the bucket is served by neither; gc with imports running
on both homes loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.home import Home
from lamina.image.importer import Imported, import_and_commit
from lamina.manager.home import open_home
from lamina.manager.services import images
from lamina.manager.store_leases import DatabaseLeases
from lamina.names import parse_ref
from lamina.store import GcReport
from lamina.store.chunker import IMAGE_CHUNK
from lamina.store.codec import chunk_id
from tests.ceph import CephCluster
from tests.conftest import Cli, write_sparse
from tests.nbdtools import ok, qemu_io
from tests.pg import PgCluster, fresh_database
from tests.s3.test_bucket_store import bucket_keys
from tests.servers import Server, member_servers, wait_for

pytestmark = pytest.mark.peers

MiB = 1 << 20
GRACE = 7.0  # past the grace period of _short_leases


@pytest.fixture
def shared(s3_env: dict[str, str], pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """One PostgreSQL database for every home and process of the test (and the bucket)."""
    url = fresh_database(pg_cluster)
    monkeypatch.setenv("LAMINA_DATABASE_URL", url)
    return url


@pytest.fixture
def homes(shared: str, tmp_path: Path) -> tuple[Cli, Cli]:
    """Two folders of one home (one database): one made by init, one joining it."""
    a, b = Cli(tmp_path / "a"), Cli(tmp_path / "b")
    a("init")
    joined = b.json("init", "--join")
    assert joined["id"] == a.json("init")["id"] and joined["created"]
    return a, b


@pytest.fixture
def servers(homes: tuple[Cli, Cli], tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    with member_servers((homes[0].home, homes[1].home), tmp_path) as pair:
        yield pair


def nbdcopy(url: str, out: Path) -> bytes:
    subprocess.run(["nbdcopy", url, str(out)], check=True, timeout=120)
    return out.read_bytes()


def test_two_servers_serve_one_bucket_and_take_over_stateless_machines(
    homes: tuple[Cli, Cli],
    servers: tuple[Server, Server],
    ceph: CephCluster,
    bucket: str,
    tmp_path: Path,
) -> None:
    cli_a, cli_b = homes
    source = write_sparse(
        tmp_path / "base.raw",
        24 * MiB,
        [(0, os.urandom(12 * MiB)), (16 * MiB, b"lamina" * 100_000)],
    )
    cli_a("image", "import", "base", str(source))
    for server in servers:
        server.start()
    for i, server in enumerate(servers):  # home b has never indexed the bucket
        assert nbdcopy(server.url("base"), tmp_path / f"base-{i}.raw") == source.read_bytes()

    cli_b("machine", "add", "m1", "--image", "base")
    cli_b("machine", "add", "m2", "--image", "base")
    shown = {m: cli_b.json("machine", "show", m) for m in ("m1", "m2")}
    assert sorted(s["server"] for s in shown.values()) == ["a", "b"]  # least loaded
    on_a = next(m for m, s in shown.items() if s["server"] == "a")
    a, b = servers
    assert shown[on_a]["nbd_server"] == f"127.0.0.1:{a.port}" and shown[on_a]["server_live"]
    assert nbdcopy(a.url(f"machine/{on_a}"), tmp_path / "m-a.raw") == source.read_bytes()

    # a stateful machine is served by its server only, and moved with its delta
    cli_b("machine", "add", "sf", "--image", "base", "--mode", "stateful")
    assert cli_b.json("machine", "show", "sf")["server"] == "a"  # a tie: by name
    ok(qemu_io(a.url("machine/sf"), f"write -P 0x5a 0 {MiB}", "flush"))
    refused = qemu_io(b.url("machine/sf"), "read 0 4k", read_only=True)
    assert refused.returncode != 0
    moved = cli_a.json("machine", "move", "sf", "--to", "b")
    assert moved["committed"] == "sf.state@1" and moved["server"] == "b"
    served = nbdcopy(b.url("machine/sf"), tmp_path / "sf.raw")
    assert served == b"\x5a" * MiB + source.read_bytes()[MiB:]

    a.stop(signal.SIGKILL)  # no goodbye: its heartbeats stop
    waited = wait_for(lambda: cli_b.json("machine", "show", on_a)["server"] == "b", timeout=30)
    assert waited < 15
    moved = cli_b.json("machine", "show", on_a)
    assert moved["nbd_server"] == f"127.0.0.1:{b.port}"
    assert nbdcopy(b.url(f"machine/{on_a}"), tmp_path / "m-b.raw") == source.read_bytes()

    # a chunk corrupted in the bucket: home b's server refuses it, cached or not
    other = write_sparse(tmp_path / "other.raw", 4 * MiB, [(0, os.urandom(4 * MiB))])
    cli_b("image", "import", "other", str(other))
    victim = other.read_bytes()[IMAGE_CHUNK : 2 * IMAGE_CHUNK]
    _corrupt(ceph, bucket, cli_b.home, victim)
    for _ in range(2):
        proc = qemu_io(b.url("other"), f"read {IMAGE_CHUNK + 4096} 4096", read_only=True)
        assert "Input/output error" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def _corrupt(ceph: CephCluster, bucket: str, home: Path, data: bytes) -> None:
    h = Home(home)
    try:
        loc = h.store.index.lookup(chunk_id(data))
    finally:
        h.close()
    assert loc is not None
    s3 = ceph.client()
    key = f"fleet/{loc.pack}"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[loc.offset + loc.size - 100] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))


def _import(home: Home, name: str, path: Path, pause: Pause | None = None) -> None:
    """Import ``path`` as ``name``; with ``pause``, stop before the commit (the import's
    chunks are in the bucket, its lease live, its manifest not yet recorded)."""

    def commit(imported: Imported) -> str:
        if pause is not None:
            pause.reached.set()
            assert pause.go.wait(120)
        with home.session() as session:
            return images.add_version(session, name=name, imported=imported, source=str(path)).ref

    import_and_commit(home.store, path, commit)


class Pause:
    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()


def _short_leases(home: Home) -> Home:
    # 3 s leases and 0.5 s to settle: a grace period of 6.5 s a test can wait through
    home.store.leases = DatabaseLeases(home, lease=3.0, settle=0.5)
    return home


def _live(home: Home) -> set[bytes]:
    from lamina.manager.services.store import live_chunks

    with home.session() as session:
        return live_chunks(session, store=home.store)


def _gc(home: Home) -> GcReport:
    return home.store.gc(lambda: _live(home))


def test_gc_with_imports_on_both_homes_loses_nothing(
    homes: tuple[Cli, Cli], ceph: CephCluster, bucket: str, tmp_path: Path
) -> None:
    a = _short_leases(open_home(homes[0].home))
    b = _short_leases(open_home(homes[1].home))
    shared, old = os.urandom(4 * MiB), os.urandom(4 * MiB)
    files = {
        "keep": [(0, os.urandom(4 * MiB)), (4 * MiB, shared)],
        "old": [(0, old), (4 * MiB, shared)],
        "late": [(0, os.urandom(4 * MiB)), (4 * MiB, shared)],
        "again": [(0, old)],  # old's chunks, imported again
        "after": [(4 * MiB, old)],
    }
    paths = {n: write_sparse(tmp_path / f"{n}.raw", 8 * MiB, e) for n, e in files.items()}
    try:
        _import(a, "keep", paths["keep"])
        _import(b, "old", paths["old"])
        with b.session() as session:
            images.remove(session, ref=parse_ref("old"))

        # home a re-imports old's data (found in the bucket: reused) and stops before its
        # commit; gc on home b finds old's pack dead and condemns it
        early = Pause()
        importer = threading.Thread(target=_import, args=(a, "again", paths["again"], early))
        importer.start()
        assert early.reached.wait(120)
        report = _gc(b)
        assert report.packs_condemned >= 1 and report.packs_removed == 0
        condemned = {f"fleet/{name}" for name in b.store.condemned}
        sizes = bucket_keys(ceph, bucket)
        old_data = {key for key in condemned if sizes[key] >= 4 * MiB}
        assert old_data  # (and a small pack: the manifest of home a's import)
        # an import on home b after the condemnation uploads old's chunks again
        before = set(bucket_keys(ceph, bucket))
        _import(b, "after", paths["after"])
        assert set(bucket_keys(ceph, bucket)) - before
        # past the grace period, home a's import (older than the condemnation) still holds
        # the condemned pack; gc runs on home a while home b imports
        time.sleep(GRACE)
        late = threading.Thread(target=_import, args=(b, "late", paths["late"]))
        late.start()
        runs = 0
        while late.is_alive() or runs < 1:
            assert _gc(a).packs_removed == 0
            runs += 1
        assert condemned <= set(bucket_keys(ceph, bucket))
        early.go.set()
        importer.join(120)
        late.join(120)
        time.sleep(GRACE)
        final = _gc(b)  # deletes what may go (re-checked), pardons the rest
        assert final.packs_removed >= 1 and final.packs_pardoned >= 1
        left = set(bucket_keys(ceph, bucket))
        # old's data went: its chunks live on in the copy home b's import made; the
        # manifest of home a's import, condemned before its commit, was pardoned
        assert not old_data & left and condemned - old_data <= left
        time.sleep(GRACE)
        _gc(a)
    finally:
        a.close()
        b.close()
    for cli in homes:  # every version reads back whole from both homes
        for name in ("keep", "again", "after", "late"):
            out = tmp_path / f"{name}-{cli.home.name}.out"
            cli("image", "export", name, str(out))
            assert out.read_bytes() == paths[name].read_bytes(), (name, cli.home.name)
    assert homes[0].json("store", "verify")["ok"]
