"""Opening a home with the manager's database (connected, checked and migrated on first
use), and making one (``lamina init``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.errors import NotAHome, UsageError
from lamina.home import IDENTITY, Home, home_path, is_older_home, read_identity, write_identity

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from lamina.manager.db import Opening
    from lamina.store.leases import Leases
    from lamina.store.location import StoreSettings


def open_home(
    root: Path | None = None,
    database_url: str | None = None,
    *,
    opening: Opening = "existing",
    store: StoreSettings | None = None,
) -> Home:
    """The home at ``root`` (``LAMINA_HOME``, else the default) with its database;
    ``NotAHome`` when there is none there. ``opening="create"`` accepts a missing or empty
    database and makes it this home's (restore, rebuild). ``store``: the chunk store's
    settings as already read (else read on first use)."""
    return Home(
        root,
        database_url,
        connect=partial(_connect, opening=opening),
        store_leases=_leases,
        store_settings=store,
    )


def _leases(home: Home) -> Leases | None:
    """Leases in the database for a bucket that several homes may share (one PostgreSQL);
    a home on SQLite is alone with its bucket prefix and keeps its file lock."""
    if home.database_url.startswith("sqlite"):
        return None
    from lamina.manager.store_leases import DatabaseLeases

    return DatabaseLeases(home)


def _connect(home: Home, *, opening: Opening) -> sessionmaker[Session]:
    from lamina.manager.db import connect  # SQLAlchemy: only once the database is used

    return connect(home, opening)


@dataclass(frozen=True, slots=True)
class Initialized:
    home: Home
    created: bool  # False: it was a home already
    adopted: bool  # a home made by an older lamina, now with an identity
    ca_taken: bool = False  # --ca: the certificate authority installed in this folder


def init_home(
    root: Path | None = None,
    database_url: str | None = None,
    *,
    join: bool = False,
    ca: Path | None = None,
) -> Initialized:
    """Make ``root`` a home: its identity and its database (created, or an older lamina's
    adopted). On a home already, only checks that its database is its own. ``join``: a
    folder of the home that the database (PostgreSQL) already belongs to, for another
    block server of a cluster; it takes that home's id. ``ca``: a folder holding a copy
    of the certificate authority the home's folders share (``ca-cert.pem``,
    ``ca-key.pem``), installed in this one. A new home on PostgreSQL (the first folder
    of a cluster) makes its CA now, for the others to copy."""
    from lamina.trust.authority import load_copy

    if ca is not None:
        load_copy(ca)  # a bad copy is refused before anything is made
    path = home_path(root)
    existed = read_identity(path) is not None
    joined = _joined_id(database_url) if join and not existed else None
    if not existed and path.exists() and not path.is_dir():
        raise NotAHome(f"{path} is not a folder")
    older = is_older_home(path)
    if not existed and not older and path.is_dir() and _has_other_files(path):
        raise NotAHome(f"{path} is not empty and not a lamina home: use another folder")
    made_folder = not path.exists()
    write_identity(path, joined)
    home = open_home(path, database_url, opening="existing" if existed else "adopt")
    try:
        _ = home.sessionmaker  # connect now: create, adopt or check the database
    except BaseException:
        if not existed:  # leave the folder as it was found
            (path / IDENTITY).unlink(missing_ok=True)
            if made_folder:
                shutil.rmtree(path, ignore_errors=True)
        raise
    return Initialized(home, created=not existed, adopted=older, ca_taken=_ca(home, ca, join))


def _ca(home: Home, ca: Path | None, join: bool) -> bool:
    from lamina.manager.services import cluster_ca

    if ca is not None:
        return cluster_ca.take(home, ca)
    if not join and cluster_ca.shared(home) and cluster_ca.recorded(home) is None:
        cluster_ca.authority(home)  # the first folder: the CA the others copy
    return False


def _joined_id(database_url: str | None) -> str:
    from lamina.manager.db import recorded_home
    from lamina.settings import load

    url = database_url or load().database_url
    if not url or url.startswith("sqlite"):
        raise UsageError("--join needs the cluster's PostgreSQL in LAMINA_DATABASE_URL")
    found = recorded_home(url)
    if found is None:
        raise NotAHome("--join: the database belongs to no home yet: `lamina init` one first")
    return found


def _has_other_files(path: Path) -> bool:
    # Hidden files (.gitkeep, a leftover temporary identity) do not make a folder in use.
    return any(not child.name.startswith(".") for child in path.iterdir())
