"""`lamina backup` and `lamina restore`: a home copied while `lamina serve` runs and a client
writes, restored into a new home whose server gives real NBD clients the machine's disk
as it was at the backup; a home that lost its database gets it back; PostgreSQL through
pg_dump and pg_restore."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from lamina.nbd import Cmd
from lamina.nbd.aioclient import NbdClient
from tests.conftest import Cli, write_sparse
from tests.servers import Server

MiB = 1 << 20

pytestmark = pytest.mark.peers


@pytest.fixture
def base(cli: Cli, tmp_path: Path) -> bytes:
    content = os.urandom(4 * MiB)
    cli("image", "import", "base", str(write_sparse(tmp_path / "b.raw", 4 * MiB, [(0, content)])))
    cli("machine", "add", "m", "--image", "base", "--mode", "stateful")
    return content


def nbdcopy(url: str, out: Path) -> bytes:
    subprocess.run(["nbdcopy", url, str(out)], check=True, capture_output=True)
    return out.read_bytes()


def patched(content: bytes, offset: int, data: bytes) -> bytes:
    return content[:offset] + data + content[offset + len(data) :]


def test_a_served_home_backed_up_while_written_restores_and_serves(
    cli: Cli, server: Server, base: bytes, tmp_path: Path
) -> None:
    before, after = os.urandom(256 * 1024), os.urandom(256 * 1024)
    backup = tmp_path / "backup"
    server.start()

    async def write_backup_write() -> None:
        client = await NbdClient.connect("127.0.0.1", server.port, "machine/m")
        assert (await client.request(Cmd.WRITE, MiB, data=before))[0] == 0
        # no FLUSH: the backup's flush point makes it durable in the copy
        done = await asyncio.to_thread(cli.json, "backup", str(backup))
        assert done["deltas"] == ["m"] and done["packs"] > 0
        assert (await client.request(Cmd.WRITE, 2 * MiB, data=after))[0] == 0  # not in it
        await client.close()

    asyncio.run(write_backup_write())
    assert any('"deltas-copied"' in ln for ln in server.log_lines())
    server.stop()

    restored = Cli(tmp_path / "restored")
    report = restored.json("restore", str(backup))
    assert report["deltas"] == ["m"] and report["skipped"] == []
    assert restored.json("image", "list")[0]["name"] == "base"
    assert restored.json("store", "verify")["ok"]
    again = Server(restored.home, tmp_path / "restored.log")
    again.start()
    try:
        disk = nbdcopy(again.url("machine/m"), tmp_path / "m.raw")
    finally:
        again.stop()
    assert disk == patched(base, MiB, before)
    # the original goes on with both writes
    server.start()
    assert nbdcopy(server.url("machine/m"), tmp_path / "o.raw") == patched(
        patched(base, MiB, before), 2 * MiB, after
    )


def test_a_backup_refreshed_in_place_copies_only_new_packs(
    cli: Cli, base: bytes, tmp_path: Path
) -> None:
    backup = tmp_path / "backup"
    first = cli.json("backup", str(backup))
    assert first["pack_bytes"] > 0
    again = cli.json("backup", str(backup))
    assert again["pack_bytes"] == 0 and again["packs"] == first["packs"]
    other = Cli(tmp_path / "other")
    other("init")
    refused = other("backup", str(backup), check=False)
    assert refused.code == 2 and "not a backup of" in refused.err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert cli("restore", str(backup), "--home", str(busy), check=False).code == 2
    assert [p.name for p in busy.iterdir()] == ["x"]


def test_a_home_that_lost_its_database_gets_it_back(cli: Cli, base: bytes, tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    cli("backup", str(backup))
    newer = write_sparse(tmp_path / "n.raw", 2 * MiB, [(0, os.urandom(2 * MiB))])
    cli("image", "import", "newer", str(newer))
    refused = cli("restore", str(backup), check=False)
    assert refused.code == 9 and "has its database" in refused.err  # nothing to restore
    for f in cli.home.glob("lamina.db*"):
        f.unlink()
    cli("restore", str(backup))
    assert [i["name"] for i in cli.json("image", "list")] == ["base"]
    assert [m["name"] for m in cli.json("machine", "list")] == ["m"]
    # the import made after the backup: kept by gc, listed again by reindex
    assert cli.json("store", "gc")["unknown_manifests"]
    (ref,) = cli.json("store", "reindex")["recovered"]
    cli("image", "export", ref, str(tmp_path / "n.out"))
    assert (tmp_path / "n.out").read_bytes() == newer.read_bytes()


def test_postgresql_is_backed_up_with_pg_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    from tests.pg import fresh_database

    cluster = request.getfixturevalue("pg_cluster")
    monkeypatch.setenv("LAMINA_DATABASE_URL", fresh_database(cluster))
    home = Cli(tmp_path / "pg-home")
    home("init")
    home("image", "import", "base", str(write_sparse(tmp_path / "b.raw", MiB, [(0, b"x" * MiB)])))
    home("machine", "add", "m", "--image", "base")
    backup = tmp_path / "backup"
    assert home.json("backup", str(backup))["database"] == "postgresql"
    assert (backup / "database" / "lamina.pgdump").stat().st_size > 0

    monkeypatch.setenv("LAMINA_DATABASE_URL", fresh_database(cluster))
    restored = Cli(tmp_path / "restored")
    restored("restore", str(backup))
    assert [m["name"] for m in restored.json("machine", "list")] == ["m"]
    assert restored.json("store", "verify")["ok"]
    monkeypatch.delenv("LAMINA_DATABASE_URL")
    wrong = Cli(tmp_path / "wrong")
    refused = wrong("restore", str(backup), check=False)
    assert refused.code == 2 and "LAMINA_DATABASE_URL" in refused.err
    assert not wrong.home.exists()
