"""Opening a home with the manager's database (connected and migrated on first use)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lamina.home import Home

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from lamina.store.leases import Leases


def open_home(root: Path | None = None, database_url: str | None = None) -> Home:
    """The home at ``root`` (``LAMINA_HOME``, else the default) with its database."""
    return Home(root, database_url, connect=_connect, store_leases=_leases)


def _leases(home: Home) -> Leases | None:
    """Leases in the database for a bucket that several homes may share (one PostgreSQL);
    a home on SQLite is alone with its bucket prefix and keeps its file lock."""
    if home.database_url.startswith("sqlite"):
        return None
    from lamina.manager.store_leases import DatabaseLeases

    return DatabaseLeases(home)


def _connect(url: str) -> sessionmaker[Session]:
    from lamina.manager.db import connect  # SQLAlchemy: only once the database is used

    return connect(url)
