"""The store's leases in a database (here SQLite; PostgreSQL in tests/s3/test_two_homes):
one gc at a time, a writer whose lease died commits nothing, condemned packs wait for
older writers and the grace period, and their chunks are uploaded again by new writers."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import delete

from lamina.errors import Conflict, StoreError
from lamina.home import Home
from lamina.manager.models import StoreLease
from lamina.manager.store_leases import DatabaseLeases
from lamina.store import ChunkStore
from lamina.store.leases import GC, IMPORT, held
from tests.servers import wait_for


def test_one_gc_at_a_time(home: Home) -> None:
    leases = DatabaseLeases(home, lease=5.0)
    with held(leases, GC), pytest.raises(Conflict, match="another `lamina store gc`"):
        leases.begin(GC)
    assert leases.begin(GC) == GC  # released: the next one gets it


def test_a_writer_whose_lease_died_commits_nothing(home: Home) -> None:
    store = ChunkStore.in_memory()
    store.leases = DatabaseLeases(home, lease=0.3)
    with pytest.raises(StoreError, match="lease expired"), store.writer() as writer:
        writer.put(b"x" * 4096)
        with home.session() as session:  # as a gc elsewhere clears an expired lease
            session.execute(delete(StoreLease))
        lease = writer.lease
        assert lease is not None
        wait_for(lambda: lease.lost, timeout=30)  # the next beat finds it gone


def test_condemned_packs_wait_for_older_writers_and_are_uploaded_again(home: Home) -> None:
    store = ChunkStore.in_memory()
    leases = store.leases = DatabaseLeases(home, lease=2.0, settle=0.05)
    with store.writer() as writer:
        first = writer.put(b"a" * 4096)
    (pack,) = store.index.packs()
    with held(leases, IMPORT):  # beating, from another thread
        time.sleep(0.1)
        leases.condemn([pack])
        time.sleep(leases.grace + 0.1)
        assert leases.deletable() == []  # an import older than the condemnation is live
    assert leases.deletable() == [pack]
    with store.writer() as writer:
        again = writer.put(b"a" * 4096)
    assert first.new and again.new  # found only in a condemned pack: stored again
    assert store.index.lookup(again.chunk_id).pack != pack
