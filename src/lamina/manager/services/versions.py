"""What image versions and layer versions share: numbering NAME@1, NAME@2, ..."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from lamina.errors import Conflict
from lamina.manager.models import VersionCounter

V = TypeVar("V")

# Concurrent imports of one name race for N+1; each loser retries with the next number.
_ATTEMPTS = 20


def next_version(
    session: Session,
    kind: str,
    name: str,
    create: Callable[[int], V],
    highest: Callable[[], int | None],
) -> V:
    """Run ``create(N)`` with the next number of ``name`` (which adds and flushes version N)
    in a savepoint, again when another writer took N first. Numbers are never reused, also
    after the versions or the whole image or layer were removed; ``highest`` (the largest
    number present) covers versions recorded with their number, such as an agent's
    replicas of a manager's layers."""
    for _attempt in range(_ATTEMPTS):
        try:
            with session.begin_nested():
                counter = session.get(VersionCounter, (kind, name))
                if counter is None:
                    counter = VersionCounter(kind=kind, name=name, last=0)
                    session.add(counter)
                counter.last = max(counter.last, highest() or 0) + 1
                return create(counter.last)
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
