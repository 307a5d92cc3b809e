"""The manager's tests run on SQLite and on a real PostgreSQL (started here, on loopback,
as the postgres user in a temp dir, stopped at the end)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import PgCluster, pg_bin

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    if pg_bin() is None:
        if os.environ.get("CI"):
            raise AssertionError("PostgreSQL is not installed (make deps installs it)")
        pytest.skip("PostgreSQL is not installed (make deps installs it)")
    cluster = PgCluster().start()
    yield cluster
    cluster.stop()


def fresh_database(cluster: PgCluster) -> str:
    """A new empty database in the cluster; its SQLAlchemy URL."""
    import psycopg

    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(
        f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return cluster.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, home_dir: Path
) -> str:
    """Which database the home (and every process started by the test) uses."""
    if request.param == "sqlite":
        monkeypatch.delenv("LAMINA_DATABASE_URL", raising=False)
        return f"sqlite:///{home_dir / 'lamina.db'}"
    url = fresh_database(request.getfixturevalue("pg_cluster"))
    monkeypatch.setenv("LAMINA_DATABASE_URL", url)
    return url
