"""The Ceph test cluster itself: a daemon that cannot start fails the set-up clearly."""

from __future__ import annotations

import socket

import pytest

from tests.ceph import CephCluster

pytestmark = pytest.mark.peers


def test_a_daemon_that_cannot_start_fails_with_its_log_and_leaves_nothing() -> None:
    cluster = CephCluster(timeout=30, attempts=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", cluster.mon_port))
        taken.listen()
        with pytest.raises(RuntimeError) as failed:
            cluster.start()
    message = str(failed.value)
    assert "mon exited" in message and "Address already in use" in message
    assert not cluster.procs and not cluster.base.exists()
