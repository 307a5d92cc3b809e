"""A lamina home: the embedded database, the chunk store, deltas and caches, in one folder.

Kept light to import (no SQLAlchemy, no pydantic until the database is first used), so a
command starts working at once; ``warm_database`` opens and migrates the database on a
background thread while, say, an import is chunking.

A home knows where its database is, not what is in it: whoever opens the home passes the
function that connects to it and migrates it (``lamina.manager.home.open_home`` passes the
manager's), so the packages below the manager use a home's folders and store without
depending on the manager.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Final

from lamina.errors import LaminaError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker
    from sqlalchemy.orm import sessionmaker as SessionFactory  # noqa: N812 - the property shadows the name

    from lamina.store import ChunkStore

    Connect = Callable[[str], sessionmaker[Session]]

# Execution option marking a connection whose transactions only read (``session(
# read_only=True)``); the engine the connect function makes honours it.
READ_ONLY: Final = "lamina_read_only"


def default_home() -> Path:
    """The configured home (``lamina.settings``: file, LAMINA_HOME), else the default."""
    from lamina.settings import load

    return load().home


class Home:
    def __init__(
        self,
        root: Path | None = None,
        database_url: str | None = None,
        *,
        connect: Connect | None = None,
    ) -> None:
        self.root = (root or default_home()).expanduser().absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self._database_url = database_url
        self._connect = connect
        self._db_lock = threading.Lock()
        self._sessionmaker: sessionmaker[Session] | None = None
        self._read_only: SessionFactory[Session] | None = None
        self._warming: threading.Thread | None = None

    @cached_property
    def database_url(self) -> str:
        """The given URL, else the configured one (LAMINA_DATABASE_URL), else SQLite here."""
        if self._database_url:
            return self._database_url
        from lamina.settings import load

        return load().database_url or f"sqlite:///{self.root / 'lamina.db'}"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def deltas_dir(self) -> Path:
        return self._dir("deltas")

    @property
    def cache_dir(self) -> Path:
        return self._dir("cache")

    @property
    def tmp_dir(self) -> Path:
        return self._dir("tmp")

    @property
    def tls_dir(self) -> Path:
        """The certificate authority and the server certificate (``lamina.trust``);
        created with the CA, on first use."""
        return self.root / "tls"

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @cached_property
    def store(self) -> ChunkStore:
        # blake3, zstd (and boto3 for a bucket): not every command needs them
        from lamina.store.location import open_store

        return open_store(self.store_dir)

    @property
    def sessionmaker(self) -> sessionmaker[Session]:
        """The session factory on the migrated database (opened on first use)."""
        with self._db_lock:
            if self._sessionmaker is None:
                if self._connect is None:
                    raise LaminaError(f"{self.root}: this home was opened without its database")
                self._sessionmaker = self._connect(self.database_url)
            return self._sessionmaker

    def warm_database(self) -> None:
        """Open and migrate the database in the background; errors surface on first use."""

        def warm() -> None:
            with contextlib.suppress(Exception):  # the foreground's first use reports it
                _ = self.sessionmaker

        self._warming = threading.Thread(target=warm, name="db-warm", daemon=True)
        self._warming.start()

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """A session that commits on success and rolls back on error. ``read_only`` sessions
        do not take SQLite's write lock, so they never wait behind writers."""
        factory = self._read_only_sessionmaker() if read_only else self.sessionmaker
        with factory() as session, session.begin():
            yield session

    def _read_only_sessionmaker(self) -> SessionFactory[Session]:
        writer = self.sessionmaker
        with self._db_lock:
            if self._read_only is None:
                from sqlalchemy.orm import sessionmaker as make

                engine = writer.kw["bind"].execution_options(**{READ_ONLY: True})
                self._read_only = make(engine, expire_on_commit=False)
            return self._read_only

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()
        if self._sessionmaker is not None:
            self._sessionmaker.kw["bind"].dispose()
