"""Machines on one image version share one cache of decompressed chunks."""

from __future__ import annotations

import os
from pathlib import Path

from lamina.home import Home
from lamina.image.importer import import_and_commit
from lamina.manager.services import images, machines
from lamina.serve.catalog import ExportCatalog
from lamina.store import ChunkCache
from tests.conftest import write_sparse


def test_memory_does_not_grow_with_the_number_of_machines(home: Home, tmp_path: Path) -> None:
    src = write_sparse(tmp_path / "d.raw", 8 << 20, [(0, os.urandom(4 << 20))])

    def commit(imported: images.Imported) -> str:
        with home.session() as session:
            return images.add_version(session, name="base", imported=imported, source="t").ref

    import_and_commit(home.store, src, commit)
    with home.session() as session:
        for i in range(16):
            machines.add(session, name=f"m{i}", image="base")
    cache = ChunkCache(64 << 20)
    catalog = ExportCatalog(home, cache)
    devices = [catalog.open(f"machine/m{i}") for i in range(16)]
    expected = src.read_bytes()
    for device in devices:
        assert b"".join(device.read(0, 8 << 20)) == expected
    # 16 chunks of data (the zero half is never loaded), held once for all 16 machines
    assert len(cache) == 16 and cache.used == 4 << 20
    assert cache.misses == 16 and cache.hits >= 15 * 16
    catalog.close_all()
