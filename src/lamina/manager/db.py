"""Engines, sessions and migrations for SQLite (embedded, WAL) and PostgreSQL.

A database describes one home's store: the home's id (``home.json``) is recorded in its
``settings`` table under ``home_id``. ``connect`` refuses, before migrating or writing
anything, a database that is missing or empty (restore a backup, or rebuild what the
store holds with ``lamina store reindex``), one made for another home, and one made by an
older lamina that never recorded a home (``lamina init`` adopts it).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lamina.errors import LaminaError, NotAHome
from lamina.home import READ_ONLY

if TYPE_CHECKING:
    from lamina.home import Home

MIGRATIONS = Path(__file__).with_name("migrations")


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Take over transaction control from pysqlite so every transaction can start
            # with BEGIN IMMEDIATE (below).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # A deferred transaction that reads and then writes fails at once with "database
            # is locked" when another writer committed in between (WAL snapshot conflict);
            # taking the write lock up front makes it wait its turn instead. Sessions that
            # only read say so (READ_ONLY) and begin deferred: WAL readers wait for nobody.
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)


HOME_KEY = "home_id"
# existing: the database must be this home's; create: a missing or empty one is made
# (lamina init, store reindex, restore); adopt: an older lamina's database is taken too.
Opening = Literal["existing", "create", "adopt"]


def connect(home: Home, opening: Opening = "existing") -> sessionmaker[Session]:
    """The home's database, checked to be the home's and migrated to the latest schema,
    and a session factory on it."""
    url = home.database_url
    shown = make_url(url).render_as_string(hide_password=True)
    if opening == "existing" and _sqlite_missing(url):
        raise NotAHome(
            f"{home.root}: its database {make_url(url).database} is missing{_hint(home)}"
        )
    engine = make_engine(url)
    try:
        fresh = current_revision(engine) is None
        if fresh and opening == "existing":
            raise NotAHome(f"{home.root}: the database {shown} is empty{_hint(home)}")
        if fresh and not _is_empty(engine):
            raise NotAHome(f"{home.root}: the database {shown} holds tables that are not lamina's")
        migrate(engine)
        _check_home(engine, home, shown, opening)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise LaminaError(f"database {shown}: {exc}") from exc
    except LaminaError:
        engine.dispose()
        raise
    return sessionmaker(engine, expire_on_commit=False)


def is_empty(url: str) -> bool:
    """True for a database that is missing (an SQLite file that is not there) or holds no
    table: one a restore may fill."""
    if _sqlite_missing(url):
        return True
    engine = make_engine(url)
    try:
        return _is_empty(engine)
    finally:
        engine.dispose()


def _hint(home: Home) -> str:
    return (
        f": restore a backup (`lamina restore BACKUP --home {home.root}`) or rebuild what "
        f"the store holds (`lamina store reindex --home {home.root}`)"
    )


def _sqlite_missing(url: str) -> bool:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return False
    return not Path(str(parsed.database)).exists()


def _is_empty(engine: Engine) -> bool:
    from sqlalchemy import inspect

    return not inspect(engine).get_table_names()


def _check_home(engine: Engine, home: Home, shown: str, opening: Opening) -> None:
    """Refuse another home's database; record this home in a new (or adopted) one."""
    with engine.begin() as conn:
        recorded = conn.execute(
            text("SELECT value FROM settings WHERE key = :k"), {"k": HOME_KEY}
        ).scalar()
        if recorded == home.id:
            return
        if recorded is not None:
            raise NotAHome(
                f"{home.root}: the database {shown} belongs to another home ({recorded[:12]}..., "
                f"this one is {home.id[:12]}...): check LAMINA_DATABASE_URL, or restore a "
                "backup of this home"
            )
        has_data = conn.execute(text("SELECT count(*) FROM image_versions")).scalar() or 0
        has_data += conn.execute(text("SELECT count(*) FROM layer_versions")).scalar() or 0
        has_data += conn.execute(text("SELECT count(*) FROM machines")).scalar() or 0
        if has_data and opening != "adopt":
            raise NotAHome(
                f"{home.root}: the database {shown} was made by an older lamina: "
                f"`lamina init --home {home.root}` adopts it"
            )
        if opening == "existing":
            raise NotAHome(f"{home.root}: the database {shown} is empty{_hint(home)}")
        conn.execute(
            text("INSERT INTO settings (key, value) VALUES (:k, :v)"),
            {"k": HOME_KEY, "v": home.id},
        )


def recorded_home(url: str) -> str | None:
    """The id of the home a database belongs to (None: none yet, or no lamina tables)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                text("SELECT value FROM settings WHERE key = :k"), {"k": HOME_KEY}
            ).scalar()
    except SQLAlchemyError:
        return None
    finally:
        engine.dispose()


def _config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


# The newest migration. Checked against Alembic's own view by the tests; kept here so that
# an up-to-date database is recognized without importing Alembic (100 ms per command).
SCHEMA_HEAD = "0013"


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except SQLAlchemyError:
            return None


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialize migrations of one database across processes."""
    if engine.url.get_backend_name() == "sqlite":
        db = engine.url.database or ""
        path = f"{db}.migrate-lock" if db and db != ":memory:" else None
        if path is None:
            yield
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
    else:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(74650271)"))
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(74650271)"))
                conn.commit()


def migrate(engine: Engine) -> None:
    if current_revision(engine) == SCHEMA_HEAD:
        return
    from alembic import command

    head = head_revision()

    with _migration_lock(engine):
        if current_revision(engine) == head:
            return
        cfg = _config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
