"""A home whose chunks live in a real RADOS Gateway bucket: import, export, serve to real
NBD clients, corruption in the bucket, an index rebuilt from the bucket, gc, the cache."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lamina.home import Home
from lamina.store import chunk_id, codec
from lamina.store.chunker import IMAGE_CHUNK
from tests.ceph import CephCluster
from tests.conftest import Cli, write_sparse
from tests.nbdtools import qemu_io
from tests.servers import Server

pytestmark = pytest.mark.peers

MiB = 1 << 20


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """40 MiB of random data (a pack big enough for a multipart upload), text, holes."""
    return write_sparse(
        tmp_path / "base.raw",
        64 * MiB,
        [(0, os.urandom(40 * MiB)), (48 * MiB, b"lamina" * 100_000)],
    )


def bucket_keys(ceph: CephCluster, bucket: str) -> dict[str, int]:
    pages = ceph.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def cache_segments(home: Path) -> list[Path]:
    return sorted((home / "store" / "cache").glob("*.seg"))


def cached_ids(home: Path) -> set[bytes]:
    """The ids of the envelopes in the disk cache's segments, from their headers."""
    ids: set[bytes] = set()
    for segment in cache_segments(home):
        data, at = segment.read_bytes(), 0
        while at < len(data):
            head = codec.parse_header(data[at : at + codec.HEADER_SIZE])
            ids.add(head.chunk_id)
            at += head.size
    return ids


def test_import_export_and_serve_through_the_bucket(
    s3_env: dict[str, str],
    ceph: CephCluster,
    bucket: str,
    cli: Cli,
    server: Server,
    source: Path,
    tmp_path: Path,
) -> None:
    cli("image", "import", "base", str(source))
    packs = bucket_keys(ceph, bucket)
    assert packs and all(k.startswith("fleet/packs/") for k in packs)
    assert max(packs.values()) > 32 * MiB  # went up as a multipart upload
    assert not list((cli.home / "store").glob("packs"))  # nothing local but index and cache
    assert (cli.home / "store" / "location.json").read_text().count(f"s3://{bucket}/fleet")

    out = tmp_path / "export.raw"
    cli("image", "export", "base", str(out))
    assert out.read_bytes() == source.read_bytes()

    server.start()
    copy = tmp_path / "nbd.raw"
    subprocess.run(["nbdcopy", server.url("base"), str(copy)], check=True, timeout=120)
    assert copy.read_bytes() == source.read_bytes()
    qcow = tmp_path / "nbd.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-O", "qcow2", server.url("base"), str(qcow)],
        check=True,
        timeout=120,
    )
    cmp = subprocess.run(["qemu-img", "compare", str(qcow), str(source)], check=False)
    assert cmp.returncode == 0


def _locate(home: Path, data: bytes) -> tuple[str, int, int]:
    """(object key under the prefix, offset, size) of the envelope of chunk ``data``."""
    h = Home(home)
    loc = h.store.index.lookup(chunk_id(data))
    h.close()
    assert loc is not None
    return loc.pack, loc.offset, loc.size


def test_a_chunk_corrupted_in_the_bucket_is_never_served(
    s3_env: dict[str, str],
    ceph: CephCluster,
    bucket: str,
    cli: Cli,
    server: Server,
    source: Path,
) -> None:
    cli("image", "import", "base", str(source))
    victim = 5  # the sixth chunk: random data, stored raw, so one flipped byte shows
    data = source.read_bytes()[victim * IMAGE_CHUNK : (victim + 1) * IMAGE_CHUNK]
    pack, offset, size = _locate(cli.home, data)
    s3 = ceph.client()
    key = f"fleet/{pack}"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[offset + size - 100] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    server.start()
    at = victim * IMAGE_CHUNK + 4096
    for _ in range(2):  # neither served nor cached: the second read fails the same way
        proc = qemu_io(server.url("base"), f"read {at} 4096", read_only=True)
        assert "Input/output error" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    healthy = qemu_io(server.url("base"), f"read -P 0x6c {48 * MiB} 1", read_only=True)
    assert "failed" not in healthy.stdout.lower(), healthy.stdout + healthy.stderr
    cached = cached_ids(cli.home)
    assert cached and chunk_id(data) not in cached  # good chunks cached, not the bad one

    result = cli("store", "verify", "--json", check=False)
    assert result.code == 7
    corrupt = {c["id"] for c in result.json()["corrupt"]}
    assert chunk_id(data).hex() in corrupt


def test_a_fresh_home_rebuilds_the_index_from_the_bucket(
    s3_env: dict[str, str], cli: Cli, source: Path, tmp_path: Path
) -> None:
    cli("image", "import", "base", str(source))
    first = Home(cli.home)
    expected = dict(first.store.index.all_chunks())
    first.close()

    fresh = Cli(tmp_path / "fresh")
    fresh("init")
    report = fresh.json("store", "reindex")
    assert report["chunks"] == len(expected) and report["changes"] == report["packs"] > 0
    # the new home's database knew nothing: the image version is back, under a new name
    assert [r.split("@")[0][:10] for r in report["recovered"]] == ["recovered-"]
    assert fresh.json("store", "reindex")["changes"] == 0
    second = Home(fresh.home)
    assert dict(second.store.index.all_chunks()) == expected
    some = sorted(expected)[:20]
    wanted = {chunk_id(second.store.get(cid)) for cid in some}
    second.close()
    assert wanted == set(some)

    # the original home loses its index: reads rebuild it from the bucket on a miss
    for f in (cli.home / "store").glob("index.sqlite*"):
        f.unlink()
    out = tmp_path / "again.raw"
    cli("image", "export", "base", str(out))
    assert out.read_bytes() == source.read_bytes()


def test_gc_in_the_bucket_removes_dead_packs_and_keeps_live_ones(
    s3_env: dict[str, str], ceph: CephCluster, bucket: str, cli: Cli, tmp_path: Path
) -> None:
    keep = write_sparse(tmp_path / "keep.raw", 8 * MiB, [(0, os.urandom(8 * MiB))])
    drop = write_sparse(tmp_path / "drop.raw", 8 * MiB, [(0, os.urandom(8 * MiB))])
    cli("image", "import", "keep", str(keep))
    live = set(bucket_keys(ceph, bucket))
    cli("image", "import", "drop", str(drop))
    dead = set(bucket_keys(ceph, bucket)) - live
    assert dead
    cli("image", "rm", "drop")

    report: dict[str, Any] = cli.json("store", "gc")
    assert report["packs_removed"] == len(dead) and report["bytes_freed"] >= 8 * MiB
    assert set(bucket_keys(ceph, bucket)) == live
    out = tmp_path / "keep.out"
    cli("image", "export", "keep", str(out))
    assert out.read_bytes() == keep.read_bytes()
    assert cli.json("store", "verify")["ok"]


def test_the_disk_cache_stays_under_its_bound(
    s3_env: dict[str, str],
    cli: Cli,
    server: Server,
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli("image", "import", "base", str(source))
    bound = 4 * MiB
    monkeypatch.setenv("LAMINA_STORE_CACHE_BYTES", "4M")
    server.start()
    for _ in range(2):
        subprocess.run(["nbdcopy", server.url("base"), str(tmp_path / "c.raw")], check=True)
        on_disk = sum(p.stat().st_size for p in cache_segments(cli.home))
        assert bound // 2 < on_disk <= bound  # filled, and within its bound
    assert (tmp_path / "c.raw").read_bytes() == source.read_bytes()


def test_the_home_keeps_its_store(
    s3_env: dict[str, str], cli: Cli, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("image", "import", "base", str(source))
    monkeypatch.delenv("LAMINA_STORE_URL")  # the record still leads to the bucket
    assert [i["name"] for i in cli.json("image", "list")] == ["base"]
    assert cli.json("store", "verify")["ok"]
    monkeypatch.setenv("LAMINA_STORE_URL", "s3://another-bucket")
    refused = cli("store", "du", check=False)
    assert refused.code == 2 and "keeps its chunks in s3://" in refused.err
    assert len(refused.err.strip().splitlines()) == 1


def test_a_local_home_with_packs_is_not_switched(
    cli: Cli, source: Path, ceph: CephCluster, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("image", "import", "base", str(source))  # no LAMINA_STORE_URL: local
    for key, value in ceph.env(bucket).items():
        monkeypatch.setenv(key, value)
    refused = cli("store", "verify", check=False)
    assert refused.code == 2 and "its local store" in refused.err
