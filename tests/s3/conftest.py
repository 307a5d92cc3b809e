"""A real RADOS Gateway for the whole session, a fresh bucket per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.ceph import CephCluster


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    cluster = CephCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def bucket(ceph: CephCluster) -> str:
    name = f"lamina-{uuid.uuid4().hex[:12]}"
    ceph.create_bucket(name)
    return name


@pytest.fixture
def s3_env(ceph: CephCluster, bucket: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process and every `lamina` it starts use ``s3://BUCKET/fleet`` here."""
    env = ceph.env(bucket, "fleet")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
