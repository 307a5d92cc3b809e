"""A throwaway PostgreSQL cluster on loopback, run as the postgres user from a temp dir."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.servers import free_port

_counter = itertools.count()


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    return Path(found[-1]).parent if found else None


def _major(path: str) -> int:
    part = path.split("/")[4]
    return int(part) if part.isdigit() else 0


class PgCluster:
    """initdb + pg_ctl in ``base`` (owned by postgres); ``url`` for SQLAlchemy."""

    def __init__(self, base: Path | None = None, *, durable: bool = False) -> None:
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (make deps installs it)")
        self.bin = bindir
        # Under /tmp by default: pytest's own temp dirs are closed to other users.
        self.base = base or Path(tempfile.mkdtemp(prefix="lamina-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.durable = durable
        self.running = False

    def _as_postgres(self, *cmd: str) -> None:
        full = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")

    def start(self) -> PgCluster:
        self.base.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.base, "postgres", "postgres")
        os.chmod(self.base, 0o700)
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"
        )
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            f"-c unix_socket_directories={self.base}",
            "-c max_connections=300",
            "-c shared_buffers=128MB",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c full_page_writes=off"]
        # Commits are acknowledged before their WAL is flushed, as SQLite's WAL with
        # synchronous=NORMAL does: a crash of the machine may lose the last few, never
        # corrupts.
        options.append("-c synchronous_commit=off")
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.base / "log"),
            "-o",
            " ".join(options),
            "-w",
            "start",
        )
        self.running = True
        self._as_postgres(
            str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "lamina"
        )
        return self

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/lamina"

    def stop(self) -> None:
        if self.running:
            self._as_postgres(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
            )
            self.running = False
        shutil.rmtree(self.base, ignore_errors=True)


def fresh_database(cluster: PgCluster) -> str:
    """A new empty database in the cluster; its SQLAlchemy URL."""
    import psycopg

    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(
        f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return cluster.url.rsplit("/", 1)[0] + f"/{name}"
