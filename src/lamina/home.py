"""A lamina home: the embedded database, the chunk store, deltas and caches, in one folder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from lamina.settings import Settings
from lamina.store import ChunkStore


class Home:
    def __init__(self, root: Path | None = None, database_url: str | None = None) -> None:
        settings = Settings()
        self.root = (root or settings.home).expanduser().absolute()
        self.database_url = (
            database_url or settings.database_url or f"sqlite:///{self.root / 'lamina.db'}"
        )
        self.settings = settings
        self.root.mkdir(parents=True, exist_ok=True)

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

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @cached_property
    def store(self) -> ChunkStore:
        return ChunkStore.open_local(self.store_dir)

    @cached_property
    def sessionmaker(self) -> sessionmaker[Session]:
        from lamina.manager.db import connect

        return connect(self.database_url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessionmaker() as session, session.begin():
            yield session

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()
        if "sessionmaker" in self.__dict__:
            bind = self.sessionmaker.kw["bind"]
            bind.dispose()
