"""What tells agents that their desired state changed: rows appended to ``changes`` in
the transaction that changed it (see ``lamina.manager.models.access``), which every
manager's long-polling agents hear about."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Select, insert, select
from sqlalchemy.orm import Session

from lamina.manager.models import Change, UserSession

# Past this many machines, one "everyone" change is cheaper than one row per machine.
FAN_OUT = 500


def touch(session: Session, machine_ids: Iterable[int] | None) -> None:
    """Record that these machines' desired state changed (None: possibly every machine)."""
    if machine_ids is None:
        session.execute(insert(Change).values(machine_id=None))
        return
    ids = sorted(set(machine_ids))
    if len(ids) > FAN_OUT:
        session.execute(insert(Change).values(machine_id=None))
    elif ids:
        session.execute(insert(Change), [{"machine_id": i} for i in ids])


def machines_of_users(session: Session, user_ids: Select[Any]) -> list[int]:
    """The machines where any of these users is logged in."""
    return list(
        session.scalars(
            select(UserSession.machine_id).where(UserSession.user_id.in_(user_ids)).distinct()
        )
    )


def machines_of_user(session: Session, user_id: int) -> list[int]:
    """The machines where the user is logged in."""
    query = select(UserSession.machine_id).where(UserSession.user_id == user_id).distinct()
    return list(session.scalars(query))
