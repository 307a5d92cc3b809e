"""The audit log: who did what, when, from where; each changing service records itself.

A front end says who is acting (``acting_as``: the account and address of an API call or
a console sign-in); the CLI on a home acts as the local user. The service that makes a
change calls ``record`` in its own transaction, so the entry is written if, and only if,
the change is; the same entry goes to the log as one JSON line (``admin-action``).
"""

from __future__ import annotations

import getpass
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from lamina import logs
from lamina.manager.models import AuditEntry, utcnow


@dataclass(frozen=True, slots=True)
class Actor:
    name: str  # the account, or the local user of the CLI
    via: str  # cli | api | console
    address: str  # the client's address, or "local"
    role: str = "admin"


def local_actor() -> Actor:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = "unknown"
    return Actor(user, "cli", "local")


_ACTOR: ContextVar[Actor | None] = ContextVar("lamina_actor", default=None)


def current() -> Actor:
    return _ACTOR.get() or local_actor()


@contextmanager
def acting_as(actor: Actor) -> Iterator[None]:
    token = _ACTOR.set(actor)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def record(session: Session, action: str, target: str, **detail: Any) -> None:
    """Note ``action`` on ``target`` by the current actor, in ``session``'s transaction."""
    actor = current()
    text = json.dumps(detail, default=str, sort_keys=True)
    session.add(
        AuditEntry(
            at=utcnow(),
            actor=actor.name[:100],
            via=actor.via,
            address=actor.address[:100],
            action=action,
            target=target[:300],
            detail=text,
        )
    )
    logs.event(
        logging.getLogger(logs.LOGGER),
        "admin-action",
        actor=actor.name,
        via=actor.via,
        address=actor.address,
        action=action,
        target=target,
        **detail,
    )


def entries(
    session: Session, *, since: datetime | None = None, limit: int = 1000, q: str | None = None
) -> list[AuditEntry]:
    """The newest entries first (at most ``limit``), from ``since`` on, those whose
    actor, action or target hold ``q``."""
    query = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc())
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    if q:
        query = query.where(
            or_(
                AuditEntry.actor.contains(q, autoescape=True),
                AuditEntry.action.contains(q, autoescape=True),
                AuditEntry.target.contains(q, autoescape=True),
            )
        )
    return list(session.scalars(query.limit(limit)))


def as_dict(entry: AuditEntry) -> dict[str, Any]:
    at = entry.at if entry.at.tzinfo else entry.at.replace(tzinfo=utcnow().tzinfo)
    return {
        "at": at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "actor": entry.actor,
        "via": entry.via,
        "address": entry.address,
        "action": entry.action,
        "target": entry.target,
        "detail": json.loads(entry.detail or "{}"),
    }
