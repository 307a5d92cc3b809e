from __future__ import annotations

from pathlib import Path

from lamina.manager import db


def test_schema_head_constant_matches_alembic() -> None:
    assert db.head_revision() == db.SCHEMA_HEAD


def test_fresh_database_is_migrated_to_head(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    assert db.current_revision(engine) is None
    db.migrate(engine)
    assert db.current_revision(engine) == db.SCHEMA_HEAD
    db.migrate(engine)  # idempotent
    engine.dispose()
