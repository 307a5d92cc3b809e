"""Paged, filtered views of the fleet for the admin API and the console: machines, images,
layers and sessions (server-side pagination: a console at 10,000 machines reads a page)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session, joinedload, selectinload

from lamina.errors import UsageError
from lamina.manager.models import (
    Entitlement,
    Image,
    ImageVersion,
    Layer,
    Machine,
    User,
    UserSession,
    WritableLayer,
)


def count_of(session: Session, query: Select[*tuple[Any, ...]]) -> int:
    """How many rows ``query`` gives (for a paged list's total)."""
    return session.scalar(select(func.count()).select_from(query.subquery())) or 0


def users_on(session: Session, machine_ids: list[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for mid, name in session.execute(
        select(UserSession.machine_id, User.name)
        .join(User, User.id == UserSession.user_id)
        .where(UserSession.machine_id.in_(machine_ids))
        .order_by(User.name)
    ):
        out.setdefault(mid, []).append(name)
    return out


MACHINE_SORTS: dict[str, tuple[Any, ...]] = {
    "name": (Machine.name,),
    "image": (Image.name, ImageVersion.version),
    "mode": (Machine.mode,),
    "hostname": (Machine.hostname,),
    "mac": (Machine.mac,),
    "last_boot": (Machine.last_boot_at.is_not(None), Machine.last_boot_at),  # never: oldest
}


def list_machines(
    session: Session,
    *,
    offset: int = 0,
    limit: int = 100,
    q: str = "",
    image: str | None = None,
    mode: str | None = None,
    state: str | None = None,
    sort: str = "name",
    descending: bool = False,
) -> tuple[list[Machine], int]:
    """A page of machines: ``q`` in the name, hostname, domain or MAC address; sorted by
    ``sort`` (one of ``MACHINE_SORTS``), then by name."""
    query = select(Machine)
    if state:
        query = query.where(_in_state(state))
    if q:
        query = query.where(
            or_(
                Machine.name.contains(q, autoescape=True),
                Machine.hostname.contains(q, autoescape=True),
                Machine.domain.contains(q, autoescape=True),
                Machine.mac.contains(q.lower(), autoescape=True),
            )
        )
    if mode:
        query = query.where(Machine.mode == mode)
    if image or sort == "image":
        query = query.join(ImageVersion, ImageVersion.id == Machine.image_version_id).join(
            Image, Image.id == ImageVersion.image_id
        )
    if image:
        query = query.where(Image.name == image)
    total = count_of(session, query)
    if sort not in MACHINE_SORTS:
        raise UsageError(f"bad sort {sort!r}: expected one of {', '.join(MACHINE_SORTS)}")
    keys = [c.desc() if descending else c.asc() for c in MACHINE_SORTS[sort]]
    rows = session.scalars(
        query.options(joinedload(Machine.image_version).joinedload(ImageVersion.image))
        .order_by(*keys, Machine.name)
        .offset(offset)
        .limit(limit)
    )
    return list(rows), total


# What a machine is doing: never booted, booted at least once, a user logged on.
STATES = ("new", "booted", "in-use")


def _in_state(state: str) -> Any:
    if state == "new":
        return Machine.last_boot_at.is_(None)
    if state == "booted":
        return Machine.last_boot_at.is_not(None)
    if state == "in-use":
        return select(UserSession.machine_id).where(UserSession.machine_id == Machine.id).exists()
    raise UsageError(f"unknown machine state {state!r} (one of: {', '.join(STATES)})")


@dataclass(frozen=True, slots=True)
class VersionRow:
    version: ImageVersion
    machines: int


def list_images(
    session: Session, *, offset: int = 0, limit: int = 100, q: str = ""
) -> tuple[list[tuple[Image, list[VersionRow]]], int]:
    query = select(Image)
    if q:
        query = query.where(Image.name.contains(q, autoescape=True))
    total = count_of(session, query)
    images = list(
        session.scalars(
            query.options(selectinload(Image.versions))
            .order_by(Image.name)
            .offset(offset)
            .limit(limit)
        )
    )
    ids = [v.id for i in images for v in i.versions]
    pinned = dict(
        session.execute(
            select(Machine.image_version_id, func.count())
            .where(Machine.image_version_id.in_(ids))
            .group_by(Machine.image_version_id)
        ).all()
    )
    return [(i, [VersionRow(v, pinned.get(v.id, 0)) for v in i.versions]) for i in images], total


def list_layers(
    session: Session, *, offset: int = 0, limit: int = 100, q: str = "", kind: str | None = None
) -> tuple[list[tuple[Layer, int]], int]:
    query = select(Layer)
    if q:
        query = query.where(Layer.name.contains(q, autoescape=True))
    if kind is not None:
        query = query.where(Layer.kind == kind)
    total = count_of(session, query)
    layers = list(
        session.scalars(
            query.options(selectinload(Layer.versions))
            .order_by(Layer.name)
            .offset(offset)
            .limit(limit)
        )
    )
    counts = dict(
        session.execute(
            select(Entitlement.layer_id, func.count())
            .where(Entitlement.layer_id.in_([la.id for la in layers]))
            .group_by(Entitlement.layer_id)
        ).all()
    )
    return [(la, counts.get(la.id, 0)) for la in layers], total


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: int
    user: str
    machine: str
    writable: str | None
    base_version: int | None
    started_at: datetime


def list_sessions(
    session: Session,
    *,
    offset: int = 0,
    limit: int = 100,
    user: str | None = None,
    machine: str | None = None,
) -> tuple[list[SessionRow], int]:
    query = (
        select(
            UserSession.id,
            User.name,
            Machine.name,
            Layer.name,
            UserSession.base_version,
            UserSession.started_at,
        )
        .join(User, User.id == UserSession.user_id)
        .join(Machine, Machine.id == UserSession.machine_id)
        .outerjoin(WritableLayer, WritableLayer.id == UserSession.writable_id)
        .outerjoin(Layer, Layer.id == WritableLayer.layer_id)
    )
    if user is not None:
        query = query.where(User.name == user)
    if machine is not None:
        query = query.where(Machine.name == machine)
    total = count_of(session, query)
    rows = session.execute(
        query.order_by(UserSession.started_at, UserSession.id).offset(offset).limit(limit)
    ).all()
    return [SessionRow(*r) for r in rows], total
