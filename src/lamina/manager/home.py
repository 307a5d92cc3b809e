"""Opening a home with the manager's database (connected, checked and migrated on first
use), and making one (``lamina init``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.errors import NotAHome
from lamina.home import IDENTITY, Home, home_path, is_older_home, read_identity, write_identity

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from lamina.manager.db import Opening


def open_home(
    root: Path | None = None, database_url: str | None = None, *, opening: Opening = "existing"
) -> Home:
    """The home at ``root`` (``LAMINA_HOME``, else the default) with its database;
    ``NotAHome`` when there is none there. ``opening="create"`` accepts a missing or empty
    database and makes it this home's (restore, rebuild)."""
    return Home(root, database_url, connect=partial(_connect, opening=opening))


def _connect(home: Home, *, opening: Opening) -> sessionmaker[Session]:
    from lamina.manager.db import connect  # SQLAlchemy: only once the database is used

    return connect(home, opening)


@dataclass(frozen=True, slots=True)
class Initialized:
    home: Home
    created: bool  # False: it was a home already
    adopted: bool  # a home made by an older lamina, now with an identity


def init_home(root: Path | None = None, database_url: str | None = None) -> Initialized:
    """Make ``root`` a home: its identity and its database (created, or an older lamina's
    adopted). On a home already, only checks that its database is its own."""
    path = home_path(root)
    existed = read_identity(path) is not None
    if not existed and path.exists() and not path.is_dir():
        raise NotAHome(f"{path} is not a folder")
    older = is_older_home(path)
    if not existed and not older and path.is_dir() and _has_other_files(path):
        raise NotAHome(f"{path} is not empty and not a lamina home: use another folder")
    made_folder = not path.exists()
    write_identity(path)
    home = open_home(path, database_url, opening="existing" if existed else "adopt")
    try:
        _ = home.sessionmaker  # connect now: create, adopt or check the database
    except BaseException:
        if not existed:  # leave the folder as it was found
            (path / IDENTITY).unlink(missing_ok=True)
            if made_folder:
                shutil.rmtree(path, ignore_errors=True)
        raise
    return Initialized(home, created=not existed, adopted=older)


def _has_other_files(path: Path) -> bool:
    # Hidden files (.gitkeep, a leftover temporary identity) do not make a folder in use.
    return any(not child.name.startswith(".") for child in path.iterdir())
