"""The S3 backend against a real RADOS Gateway: the Backend contract, errors, uploads."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import pytest

from lamina.errors import StoreError
from lamina.store.backends.s3 import MULTIPART_FROM, S3Backend
from tests.ceph import CephCluster

pytestmark = pytest.mark.peers

MiB = 1 << 20


def backend(
    ceph: CephCluster, bucket: str, *, client: Any = None, upload_grace: float = 3600.0
) -> S3Backend:
    return S3Backend(
        bucket,
        "fleet",
        endpoint_url=ceph.endpoint_url,
        lock=lambda **_: nullcontext(),
        client=client or ceph.client(),
        upload_grace=upload_grace,
    )


def test_objects_round_trip_by_range_under_the_prefix(ceph: CephCluster, bucket: str) -> None:
    b = backend(ceph, bucket)
    small, large = os.urandom(100_000), os.urandom(MULTIPART_FROM + 3 * MiB + 17)
    b.put("packs/aa/small.pack", [small[:10], memoryview(small)[10:]])
    b.put("packs/bb/large.pack", [large])  # multipart: parts of 8 MiB and a tail
    assert b.read("packs/aa/small.pack") == small
    assert b.read("packs/bb/large.pack", 5, 1000) == large[5:1005]
    assert b.read("packs/bb/large.pack", len(large) - 10) == large[-10:]
    assert b.size("packs/bb/large.pack") == len(large)
    assert sorted(b.list("packs/")) == ["packs/aa/small.pack", "packs/bb/large.pack"]
    s3 = ceph.client()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["fleet/packs/aa/small.pack", "fleet/packs/bb/large.pack"]
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")  # completed
    b.delete("packs/aa/small.pack")
    with pytest.raises(FileNotFoundError):
        b.read("packs/aa/small.pack", 0, 10)
    with pytest.raises(FileNotFoundError):
        backend(ceph, bucket).size("packs/aa/small.pack")  # a fresh backend asks the bucket
    b.close()


def test_pack_sized_bodies_reuse_buffers_without_mixing_them(
    ceph: CephCluster, bucket: str
) -> None:
    b = backend(ceph, bucket)
    sizes = (10 * MiB, 9 * MiB + 7, 11 * MiB + 3, 9 * MiB)  # shrinking and growing again
    bodies = {f"packs/ee/{i}.pack": os.urandom(n) for i, n in enumerate(sizes)}
    for name, body in bodies.items():
        b.put(name, [body[:5], memoryview(body)[5:]])
    assert {name: b.read(name) for name in bodies} == bodies


def test_a_range_past_the_end_is_a_store_error(ceph: CephCluster, bucket: str) -> None:
    b = backend(ceph, bucket)
    b.put("packs/cc/x.pack", [b"0123456789"])
    with pytest.raises(StoreError, match="short read"):
        b.read("packs/cc/x.pack", 5, 10)
    with pytest.raises(StoreError, match=r"x\.pack"):
        b.read("packs/cc/x.pack", 50, 10)


def test_failures_are_one_line_store_errors(ceph: CephCluster, bucket: str) -> None:
    with pytest.raises(StoreError, match="the bucket does not exist") as missing:
        backend(ceph, "no-such-bucket-here").put("packs/x.pack", [b"x"])
    wrong = backend(ceph, bucket, client=ceph.client(secret="not-the-secret"))
    with pytest.raises(StoreError, match="access denied") as denied:
        wrong.put("packs/x.pack", [b"x"])
    dead = backend(ceph, bucket, client=ceph.client(endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:9") as unreachable:
        list(dead.list("packs/"))
    for exc in (missing, denied, unreachable):
        assert "\n" not in str(exc.value)


def test_gc_aborts_only_stale_multipart_uploads(ceph: CephCluster, bucket: str) -> None:
    s3 = ceph.client()
    s3.create_multipart_upload(Bucket=bucket, Key="fleet/packs/dd/killed.pack")
    assert backend(ceph, bucket).clean_temporaries(older_than=0.0) == 0  # maybe in flight
    assert len(s3.list_multipart_uploads(Bucket=bucket)["Uploads"]) == 1
    assert backend(ceph, bucket, upload_grace=0.0).clean_temporaries(older_than=0.0) == 1
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
