"""Engines, sessions and migrations for SQLite (embedded, WAL) and PostgreSQL."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lamina.errors import LaminaError
from lamina.home import READ_ONLY

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


def connect(url: str) -> sessionmaker[Session]:
    """An engine migrated to the latest schema, and a session factory on it."""
    engine = make_engine(url)
    try:
        migrate(engine)
    except SQLAlchemyError as exc:
        raise LaminaError(
            f"database {engine.url.render_as_string(hide_password=True)}: {exc}"
        ) from exc
    return sessionmaker(engine, expire_on_commit=False)


def _config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


# The newest migration. Checked against Alembic's own view by the tests; kept here so that
# an up-to-date database is recognized without importing Alembic (100 ms per command).
SCHEMA_HEAD = "0008"


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
