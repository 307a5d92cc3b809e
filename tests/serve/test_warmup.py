"""A version's boot set is made ready before its machines ask: a process that opens a
version with a boot profile warms the profiled chunks (its share of them, when several
processes serve), each chunk once, and the data served stays the image's."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from lamina.home import Home
from lamina.image.importer import Imported, import_and_commit
from lamina.manager.services import images, profiles
from lamina.serve.filedevices import FileCatalog
from lamina.serve.imagefiles import NOT_READY, ImageFiles
from lamina.serve.warmup import WARM_MAX, share, warm
from tests.conftest import write_sparse
from tests.nbdtools import Session
from tests.serve.test_workers import events, text
from tests.servers import Server, wait_for

MiB = 1 << 20
CHUNK = 256 << 10


def test_the_processes_split_a_profile_without_overlap() -> None:
    order = list(range(WARM_MAX + 100))[::-1]
    parts = [share(order, i, 3) for i in range(3)]
    together = sorted(x for part in parts for x in part)
    assert together == sorted(order[:WARM_MAX])  # all of it once, up to the cap
    assert list(share(order, 0, 1)) == order[:WARM_MAX]


@pytest.fixture
def version(home: Home, tmp_path: Path) -> tuple[bytes, Path]:
    """2 MiB random (stored raw), 2 MiB text (compressed), 4 MiB zeros: 32 chunks."""
    src = write_sparse(
        tmp_path / "d.raw", 8 * MiB, [(0, os.urandom(2 * MiB)), (2 * MiB, text(2 * MiB))]
    )

    def commit(imported: Imported) -> str:
        with home.session() as session:
            return images.add_version(session, name="base", imported=imported, source="t").ref

    _ref, imported = import_and_commit(home.store, src, commit)
    return imported.manifest_id, src


def ready(files: ImageFiles) -> set[int]:
    return {i for i in range(files.manifest.count) if files.state[i] != NOT_READY}


def test_opening_a_profiled_version_warms_its_boot_set(
    home: Home, version: tuple[bytes, Path]
) -> None:
    manifest_id, src = version
    boot_set = [12, 3, 9, 0, 15]  # raw (0-7) and compressed (8-15) chunks, in boot order
    profiles.save(home, manifest_id, boot_set)
    catalog = FileCatalog(home)
    device = catalog.open("base")
    files = catalog.image_files(manifest_id)
    for thread in catalog.warmer.threads:
        thread.join(timeout=30)
    assert ready(files) == set(boot_set)  # those, before any read, and nothing else
    assert files.hydrations == len(boot_set)
    data = b"".join(device.read(0, 8 * MiB))
    assert hashlib.sha256(data).digest() == hashlib.sha256(src.read_bytes()).digest()
    catalog.close_all()


def test_two_processes_warm_each_chunk_once(home: Home, version: tuple[bytes, Path]) -> None:
    manifest_id, _src = version
    boot_set = list(range(16))
    profiles.save(home, manifest_id, boot_set)
    catalogs = [FileCatalog(home, share=(i, 2)) for i in range(2)]
    files = [c.image_files(manifest_id) for c in catalogs]  # one directory: shared state
    for c in catalogs:
        for thread in c.warmer.threads:
            thread.join(timeout=30)
    assert ready(files[0]) == set(boot_set)
    assert [f.hydrations for f in files] == [8, 8]
    for c in catalogs:
        c.close_all()


def test_a_warm_up_stops_when_asked(home: Home, version: tuple[bytes, Path]) -> None:
    manifest_id, _src = version
    catalog = FileCatalog(home)
    files = catalog.image_files(manifest_id)
    stop = threading.Event()
    stop.set()
    assert warm(files, list(range(16)), stop) == 0
    assert ready(files) == set()
    catalog.close_all()


def test_workers_of_a_server_share_the_warm_up(
    home: Home, home_dir: Path, version: tuple[bytes, Path], tmp_path: Path
) -> None:
    """Two workers, a version with a profile: each worker that opens it warms its half
    (the profile comes from the parent), and between them each chunk is made ready once,
    before anything is read."""
    manifest_id, _src = version
    profiles.save(home, manifest_id, list(range(16)))
    server = Server(home_dir, tmp_path / "serve.log", args=("--workers", "2"))
    server.start()
    try:
        # two connections held at once: the dispatcher gives one to each worker
        first = Session(server.url("base"), read_only=True)
        second = Session(server.url("base"), read_only=True)
        wait_for(lambda: len(events(server, "warmed")) == 2, timeout=30)
        warmed = events(server, "warmed")
        assert sorted(e["worker"] for e in warmed) == [0, 1]
        assert [(e["chunks"], e["of"]) for e in warmed] == [(8, 8), (8, 8)]
        assert "fail" not in second.run("read -P 0 4M 4M")  # the zero half, as stored
        first.close()
        second.close()
    finally:
        server.stop()
    stopped = events(server, "worker-stopped")
    assert sum(e["hydrated"] for e in stopped) == 16  # each chunk once, none again
