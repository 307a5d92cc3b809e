"""What the console shows about layers, users and groups beyond ``access`` and ``fleet``:
layer versions with their bases, users' writable layers (size, sessions, pending rebases),
groups' members and layers, and removing an entitlement from a layer's page."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from lamina.manager.models import (
    Entitlement,
    Layer,
    LayerVersion,
    LayerVersionBase,
    Machine,
    Membership,
    User,
    UserSession,
    WritableLayer,
)
from lamina.manager.services import layers

# -- layers -----------------------------------------------------------------------------------


def layer_versions(session: Session, *, name: str) -> list[tuple[LayerVersion, list[str]]]:
    """A layer's versions, newest first, each with the refs of its bases."""
    layer = layers.get_layer(session, name)
    versions = list(
        session.scalars(
            select(LayerVersion)
            .where(LayerVersion.layer_id == layer.id)
            .order_by(LayerVersion.version.desc())
        )
    )
    bases: dict[int, list[str]] = {}
    for vid, ref in session.execute(
        select(LayerVersionBase.version_id, LayerVersionBase.base_ref)
        .where(LayerVersionBase.version_id.in_([v.id for v in versions]))
        .order_by(LayerVersionBase.version_id, LayerVersionBase.position)
    ):
        bases.setdefault(vid, []).append(ref)
    return [(v, bases.get(v.id, [])) for v in versions]


# -- users and groups -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserExtra:
    sessions: list[str] = field(default_factory=list)  # machines the user is logged in on
    writable_bytes: int = 0  # file data of the writable layer's latest version
    entitled: list[str] = field(default_factory=list)  # layers entitled to the user directly
    # Bases of the writable layer's latest version that have newer versions since: what a
    # rebase would move it onto ("app@1 -> @2").
    pending_rebase: list[str] = field(default_factory=list)


def _entitled_layers(
    session: Session, owner: InstrumentedAttribute[int | None], ids: list[int]
) -> dict[int, list[str]]:
    """Names of the layers entitled directly to each of ``ids`` (``owner``: the
    entitlement's user or group column), in attach order."""
    out: dict[int, list[str]] = {}
    for oid, layer in session.execute(
        select(owner, Layer.name)
        .join(Layer, Layer.id == Entitlement.layer_id)
        .where(owner.in_(ids))
        .order_by(Entitlement.priority, Layer.name)
    ):
        if oid is not None:
            out.setdefault(oid, []).append(layer)
    return out


def user_extras(session: Session, *, user_ids: list[int]) -> dict[int, UserExtra]:
    sessions: dict[int, list[str]] = {}
    for uid, machine in session.execute(
        select(UserSession.user_id, Machine.name)
        .join(Machine, Machine.id == UserSession.machine_id)
        .where(UserSession.user_id.in_(user_ids))
        .order_by(Machine.name)
    ):
        sessions.setdefault(uid, []).append(machine)
    entitled = _entitled_layers(session, Entitlement.user_id, user_ids)
    inner = aliased(LayerVersion)  # the outer query joins LayerVersion too
    latest_id = (
        select(inner.id)
        .where(inner.layer_id == WritableLayer.layer_id)
        .order_by(inner.version.desc())
        .limit(1)
        .scalar_subquery()
    )
    latest: dict[int, tuple[int, int]] = {}
    for uid, vid, size in session.execute(
        select(WritableLayer.user_id, LayerVersion.id, LayerVersion.size)
        .join(LayerVersion, LayerVersion.id == latest_id)
        .where(WritableLayer.user_id.in_(user_ids))
    ):
        latest[uid] = (vid, size)
    base = aliased(LayerVersion)
    other = aliased(LayerVersion)
    newest = (
        select(func.max(other.version)).where(other.layer_id == base.layer_id).scalar_subquery()
    )
    pending: dict[int, list[str]] = {}
    by_version = {vid: uid for uid, (vid, _size) in latest.items()}
    for vid, ref, have, top in session.execute(
        select(LayerVersionBase.version_id, LayerVersionBase.base_ref, base.version, newest)
        .join(base, base.id == LayerVersionBase.base_id)
        .where(LayerVersionBase.version_id.in_(list(by_version)))
        .order_by(LayerVersionBase.position)
    ):
        if top is not None and top > have:
            pending.setdefault(by_version[vid], []).append(f"{ref} → @{top}")
    return {
        uid: UserExtra(
            sessions=sessions.get(uid, []),
            writable_bytes=latest.get(uid, (0, 0))[1],
            entitled=entitled.get(uid, []),
            pending_rebase=pending.get(uid, []),
        )
        for uid in user_ids
    }


def group_layers(session: Session, *, group_ids: list[int]) -> dict[int, list[str]]:
    return _entitled_layers(session, Entitlement.group_id, group_ids)


def group_members(
    session: Session, *, group_ids: list[int], limit: int = 20
) -> dict[int, list[str]]:
    """Up to ``limit`` member names per group (the page shows the count beside them)."""
    out: dict[int, list[str]] = {}
    for gid, name in session.execute(
        select(Membership.group_id, User.name)
        .join(User, User.id == Membership.user_id)
        .where(Membership.group_id.in_(group_ids))
        .order_by(User.name)
    ):
        names = out.setdefault(gid, [])
        if len(names) < limit:
            names.append(name)
    return out
