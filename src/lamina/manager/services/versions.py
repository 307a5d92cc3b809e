"""What image versions and layer versions share: numbering NAME@1, NAME@2, ..."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from lamina.errors import Conflict

V = TypeVar("V")

# Concurrent imports of one name race for N+1; each loser retries with the next number.
_ATTEMPTS = 20


def next_version(session: Session, name: str, create: Callable[[], V]) -> V:
    """Run ``create`` (which reads the latest number, adds N+1 and flushes) in a savepoint,
    again when the unique (owner, version) constraint says another writer took N+1."""
    for _attempt in range(_ATTEMPTS):
        try:
            with session.begin_nested():
                return create()
        except IntegrityError:
            session.expire_all()
    raise Conflict(f"could not allocate a version number for {name!r}")


def pick(
    session: Session,
    query: Select[V],
    column: InstrumentedAttribute[Any],
    version: int | None,
) -> V | None:
    """The given version from ``query``, or its latest one when ``version`` is None."""
    if version is None:
        query = query.order_by(column.desc()).limit(1)
    else:
        query = query.where(column == version)
    return session.scalars(query).first()
