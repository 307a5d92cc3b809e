"""A lamina home: the embedded database, the chunk store, deltas and caches, in one folder.

A home knows it is one: ``lamina init`` writes ``home.json`` (its identity, below), and
every other command refuses a folder without it, so a typo in ``--home`` never creates a
new, empty home. The database records the same id (``lamina.manager.db``): a database that
is missing, empty or another home's is refused before anything reads or writes it.

    home.json   {"format": 1, "id": "<32 hex digits>", "created": "<ISO 8601 UTC>"}

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
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Final

from lamina.errors import LaminaError, NotAHome

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker
    from sqlalchemy.orm import sessionmaker as SessionFactory  # noqa: N812 - the property shadows the name

    from lamina.store import ChunkStore
    from lamina.store.leases import Leases
    from lamina.store.location import StoreSettings

    Connect = Callable[["Home"], sessionmaker[Session]]

# Execution option marking a connection whose transactions only read (``session(
# read_only=True)``); the engine the connect function makes honours it.
READ_ONLY: Final = "lamina_read_only"


IDENTITY: Final = "home.json"
IDENTITY_FORMAT: Final = 1
# What a home made before homes had an identity holds (adopted by ``lamina init``).
_OLDER_HOME: Final = ("lamina.db", "store", "deltas")


def default_home() -> Path:
    """The configured home (``lamina.settings``: file, LAMINA_HOME), else the default."""
    from lamina.settings import load

    return load().home


def home_path(root: Path | None) -> Path:
    return (root or default_home()).expanduser().absolute()


def read_identity(root: Path) -> str | None:
    """The id recorded in ``root/home.json``; None when there is no such file."""
    try:
        data = json.loads((root / IDENTITY).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise NotAHome(f"{root / IDENTITY}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != IDENTITY_FORMAT:
        raise NotAHome(f"{root / IDENTITY}: unknown format (a newer lamina?)")
    ident = data.get("id")
    if not isinstance(ident, str) or len(ident) != 32:
        raise NotAHome(f"{root / IDENTITY}: no valid id")
    return ident


def is_older_home(root: Path) -> bool:
    """A home made by a lamina from before ``home.json`` (``lamina init`` adopts it)."""
    return read_identity(root) is None and any((root / n).exists() for n in _OLDER_HOME)


def not_a_home(root: Path) -> NotAHome:
    if is_older_home(root):
        return NotAHome(
            f"{root} is a home made by an older lamina: `lamina init --home {root}` adopts it"
        )
    why = "" if root.is_dir() else " (no such folder)"
    return NotAHome(
        f"{root} is not a lamina home{why}: create one with `lamina init --home {root}`"
    )


def write_identity(root: Path, ident: str | None = None) -> str:
    """Give ``root`` an identity unless it has one (another process may be doing the same:
    the first link wins); returns the id. ``ident``: the id of the home whose database
    another folder joins (a cluster's block servers are folders of one home)."""
    from datetime import UTC, datetime

    from lamina.files import fsync_dir

    root.mkdir(parents=True, exist_ok=True)
    found = read_identity(root)
    if found is not None:
        return found
    body = {
        "format": IDENTITY_FORMAT,
        "id": ident or uuid.uuid4().hex,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tmp = root / f".{IDENTITY}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(body) + "\n")
    try:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, root / IDENTITY)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(root)
    ident = read_identity(root)
    assert ident is not None
    return ident


class Home:
    """An existing home (``NotAHome`` otherwise); ``lamina.manager.home.init_home`` makes one."""

    def __init__(
        self,
        root: Path | None = None,
        database_url: str | None = None,
        *,
        connect: Connect | None = None,
        store_leases: Callable[[Home], Leases | None] | None = None,
        store_settings: StoreSettings | None = None,
    ) -> None:
        self.root = home_path(root)
        ident = read_identity(self.root)
        if ident is None:
            raise not_a_home(self.root)
        self.id = ident
        self._database_url = database_url
        self._connect = connect
        self._store_leases = store_leases
        self._store_settings = store_settings  # None: read from the settings on first use
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

        leases = self._store_leases
        return open_store(
            self.store_dir,
            leases=(lambda: leases(self)) if leases else None,
            settings=self._store_settings,
        )

    @property
    def sessionmaker(self) -> sessionmaker[Session]:
        """The session factory on the migrated database (opened on first use)."""
        with self._db_lock:
            if self._sessionmaker is None:
                if self._connect is None:
                    raise LaminaError(f"{self.root}: this home was opened without its database")
                self._sessionmaker = self._connect(self)
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
