"""Fixtures shared by every test: a fresh lamina home (made with ``init_home``, as
``lamina init`` makes one) and the real CLI as a subprocess, a
`lamina serve` on free ports, the database (SQLite, and a real PostgreSQL started here on
loopback, as the postgres user in a temp dir, stopped at the end), and the cleanup of
whatever a test left mounted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lamina.home import Home
from lamina.layer.overlay import mountinfo
from lamina.manager.home import init_home, open_home

if TYPE_CHECKING:
    from tests.pg import PgCluster
    from tests.servers import Server

LAMINA = str(Path(sys.executable).with_name("lamina"))


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Cli:
    """Runs ``lamina ... --home HOME`` as a real process."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> Result:
        env = {**os.environ, "LAMINA_HOME": str(self.home)}
        proc = subprocess.run(
            [LAMINA, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"lamina {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return self(*args, "--json").json()


@pytest.fixture
def home_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """An initialized home: its identity and its (migrated, empty) database."""
    if "database" in request.fixturenames:
        request.getfixturevalue("database")  # the home's database is chosen first
    path = tmp_path / "home"
    init_home(path).home.close()
    return path


@pytest.fixture
def home(home_dir: Path) -> Iterator[Home]:
    h = open_home(home_dir)
    yield h
    h.close()


@pytest.fixture
def cli(home_dir: Path) -> Cli:
    return Cli(home_dir)


def write_sparse(path: Path, size: int, extents: list[tuple[int, bytes]]) -> Path:
    """A sparse file of ``size`` bytes with data only at the given extents."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)
    return path


@pytest.fixture
def server(cli: Cli, tmp_path: Path) -> Iterator[Server]:
    """A `lamina serve` on free loopback ports, over the test's home (started by the test)."""
    from tests.servers import Server

    srv = Server(cli.home, tmp_path / "serve.log")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _unmount_leftovers(tmp_path: Path) -> Iterator[None]:
    """Whatever a test mounted under its tmp_path goes, latest first, even on failure."""
    yield
    for _ in range(3):
        mine = [m for m in mountinfo() if m.mountpoint.startswith(str(tmp_path))]
        if not mine:
            return
        for m in reversed(mine):
            subprocess.run(["umount", "-l", m.mountpoint], capture_output=True, check=False)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    from tests.pg import PgCluster, pg_bin

    if pg_bin() is None:
        if os.environ.get("CI"):
            raise AssertionError("PostgreSQL is not installed (make deps installs it)")
        pytest.skip("PostgreSQL is not installed (make deps installs it)")
    cluster = PgCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    """Which database the home (and every process started by the test) uses; chosen
    before the home is made (``home_dir``), which makes it the home's."""
    if request.param == "sqlite":
        monkeypatch.delenv("LAMINA_DATABASE_URL", raising=False)
        return f"sqlite:///{tmp_path / 'home' / 'lamina.db'}"
    from tests.pg import fresh_database

    url = fresh_database(request.getfixturevalue("pg_cluster"))
    monkeypatch.setenv("LAMINA_DATABASE_URL", url)
    return url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the one Ceph cluster run in one worker (``pytest -n``): it starts once."""
    for item in items:
        if "ceph" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ceph"))
