"""Users, groups, memberships and entitlements (the admin side of who gets what).

Every change that can alter what some machine should have mounted appends to ``changes``
(see ``lamina.manager.models.access``) in the same transaction, so every manager's
long-polling agents hear about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lamina.errors import AlreadyExists, Conflict, NotFound, UsageError
from lamina.layer.changes import WritablePolicy
from lamina.layer.records import APP
from lamina.manager.models import (
    Entitlement,
    Group,
    Layer,
    LayerVersion,
    Machine,
    Membership,
    User,
    UserSession,
    WritableLayer,
)
from lamina.manager.schemas import Unentitled
from lamina.manager.services import audit, fleet
from lamina.manager.services import layers as layer_svc
from lamina.manager.services.changes import machines_of_user, machines_of_users, touch
from lamina.names import check_user_name, parse_ref

POLICIES = tuple(p.value for p in WritablePolicy)


def writable_name(user: str) -> str:
    return f"writable-{user}"


def _policy(policy: str) -> str:
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r} (all, profile or apps)")
    return policy


def _add_unique(session: Session, row: object, taken: str) -> None:
    """Add and flush ``row`` in a savepoint; AlreadyExists(``taken``) when a unique
    constraint refuses it (the session stays usable)."""
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        raise AlreadyExists(taken) from None


# -- users ------------------------------------------------------------------------------------


def get_user(session: Session, name: str) -> User:
    user = session.scalars(select(User).where(User.name == name)).one_or_none()
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def get_group(session: Session, name: str) -> Group:
    group = session.scalars(select(Group).where(Group.name == name)).one_or_none()
    if group is None:
        raise NotFound(f"no group named {name!r}")
    return group


def add_user(
    session: Session, *, name: str, groups: Sequence[str] = (), policy: str = "all"
) -> User:
    """A user, the user's memberships, and the user's writable layer (created empty)."""
    check_user_name(name)
    found = [get_group(session, g) for g in dict.fromkeys(groups)]
    user = User(name=name)
    _add_unique(session, user, f"a user named {name!r} already exists")
    layer = layer_svc.ensure_writable(session, writable_name(name))
    session.add(WritableLayer(user_id=user.id, layer_id=layer.id, policy=_policy(policy)))
    for g in found:
        session.add(Membership(user_id=user.id, group_id=g.id))
    session.flush()
    audit.record(session, "user.add", name, groups=[g.name for g in found], policy=policy)
    return user


def update_user(
    session: Session, *, name: str, policy: str | None = None, groups: Sequence[str] | None = None
) -> User:
    user = get_user(session, name)
    if policy is not None:
        wl = session.scalars(select(WritableLayer).where(WritableLayer.user_id == user.id)).one()
        wl.policy = _policy(policy)
    if groups is not None:
        wanted = {get_group(session, g).id for g in groups}
        session.execute(delete(Membership).where(Membership.user_id == user.id))
        session.add_all(Membership(user_id=user.id, group_id=g) for g in sorted(wanted))
    session.flush()
    touch(session, machines_of_user(session, user.id))
    audit.record(session, "user.change", name, policy=policy, groups=groups)
    return user


def remove_user(session: Session, *, name: str) -> None:
    """Remove a user; refused while logged in. The writable layer's data stays (``layer rm``
    removes it), and a user added again under the same name gets it back."""
    user = get_user(session, name)
    where = session.scalars(
        select(Machine.name)
        .join(UserSession, UserSession.machine_id == Machine.id)
        .where(UserSession.user_id == user.id)
        .limit(1)
    ).first()
    if where is not None:
        raise Conflict(f"user {name!r} is logged in on {where}")
    session.delete(user)
    session.flush()
    audit.record(session, "user.remove", name)


@dataclass(frozen=True, slots=True)
class UserRow:
    user: User
    groups: list[str]
    writable: str | None
    policy: str | None
    writable_version: int | None
    in_use_on: str | None


def _user_rows(session: Session, users: list[User]) -> list[UserRow]:
    ids = [u.id for u in users]
    groups: dict[int, list[str]] = {}
    for uid, gname in session.execute(
        select(Membership.user_id, Group.name)
        .join(Group, Group.id == Membership.group_id)
        .where(Membership.user_id.in_(ids))
        .order_by(Group.name)
    ):
        groups.setdefault(uid, []).append(gname)
    latest = (
        select(func.max(LayerVersion.version))
        .where(LayerVersion.layer_id == Layer.id)
        .scalar_subquery()
    )
    writable = {
        uid: (lname, policy, version, where)
        for uid, lname, policy, version, where in session.execute(
            select(WritableLayer.user_id, Layer.name, WritableLayer.policy, latest, Machine.name)
            .join(Layer, Layer.id == WritableLayer.layer_id)
            .outerjoin(UserSession, UserSession.writable_id == WritableLayer.id)
            .outerjoin(Machine, Machine.id == UserSession.machine_id)
            .where(WritableLayer.user_id.in_(ids))
        )
    }
    out = []
    for u in users:
        w = writable.get(u.id)
        out.append(
            UserRow(
                u,
                groups.get(u.id, []),
                w[0] if w else None,
                w[1] if w else None,
                w[2] if w else None,
                w[3] if w else None,
            )
        )
    return out


def list_users(
    session: Session, *, offset: int = 0, limit: int = 100, q: str = "", group: str | None = None
) -> tuple[list[UserRow], int]:
    query = select(User)
    if q:
        query = query.where(User.name.contains(q, autoescape=True))
    if group is not None:
        query = query.join(Membership, Membership.user_id == User.id).where(
            Membership.group_id == get_group(session, group).id
        )
    total = fleet.count_of(session, query)
    users = list(session.scalars(query.order_by(User.name).offset(offset).limit(limit)))
    return _user_rows(session, users), total


def user_row(session: Session, name: str) -> UserRow:
    return _user_rows(session, [get_user(session, name)])[0]


# -- groups -----------------------------------------------------------------------------------


def add_group(session: Session, *, name: str) -> Group:
    check_user_name(name, "group name")
    group = Group(name=name)
    _add_unique(session, group, f"a group named {name!r} already exists")
    audit.record(session, "group.add", name)
    return group


def remove_group(session: Session, *, name: str) -> None:
    group = get_group(session, name)
    members = select(Membership.user_id).where(Membership.group_id == group.id)
    touch(session, machines_of_users(session, members))
    session.delete(group)
    session.flush()
    audit.record(session, "group.remove", name)


def list_groups(
    session: Session, *, offset: int = 0, limit: int = 100, q: str = ""
) -> tuple[list[tuple[Group, int]], int]:
    query = select(Group)
    if q:
        query = query.where(Group.name.contains(q, autoescape=True))
    total = fleet.count_of(session, query)
    groups = list(session.scalars(query.order_by(Group.name).offset(offset).limit(limit)))
    counts = dict(
        session.execute(
            select(Membership.group_id, func.count())
            .where(Membership.group_id.in_([g.id for g in groups]))
            .group_by(Membership.group_id)
        ).all()
    )
    return [(g, counts.get(g.id, 0)) for g in groups], total


def add_member(session: Session, *, group: str, user: str) -> None:
    g, u = get_group(session, group), get_user(session, user)
    _add_unique(
        session, Membership(user_id=u.id, group_id=g.id), f"{user!r} is already in {group!r}"
    )
    touch(session, machines_of_user(session, u.id))
    audit.record(session, "group.member.add", group, user=user)


def remove_member(session: Session, *, group: str, user: str) -> None:
    g, u = get_group(session, group), get_user(session, user)
    gone = session.execute(
        delete(Membership).where(Membership.user_id == u.id, Membership.group_id == g.id)
    )
    if not gone.rowcount:  # type: ignore[attr-defined]
        raise NotFound(f"{user!r} is not in {group!r}")
    touch(session, machines_of_user(session, u.id))
    audit.record(session, "group.member.remove", group, user=user)


# -- entitlements -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # user | group | machine
    id: int
    name: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"


def target(
    session: Session,
    *,
    user: str | None = None,
    group: str | None = None,
    machine: str | None = None,
) -> Target:
    if sum(x is not None for x in (user, group, machine)) != 1:
        raise UsageError("give exactly one of --user, --group, --machine")
    if user is not None:
        return Target("user", get_user(session, user).id, user)
    if group is not None:
        return Target("group", get_group(session, group).id, group)
    assert machine is not None
    m = session.scalars(select(Machine.id).where(Machine.name == machine)).one_or_none()
    if m is None:
        raise NotFound(f"no machine named {machine!r}")
    return Target("machine", m, machine)


def _affected(session: Session, t: Target) -> list[int]:
    if t.kind == "machine":
        return [t.id]
    if t.kind == "user":
        return machines_of_user(session, t.id)
    return machines_of_users(session, select(Membership.user_id).where(Membership.group_id == t.id))


def entitle(session: Session, *, layer: str, to: Target, priority: int = 100) -> Entitlement:
    """Entitle ``layer`` (NAME follows its latest version, NAME@V pins one) to a target."""
    ref = parse_ref(layer, "layer name")
    found = layer_svc.get_layer(session, ref.name)
    if found.kind != APP:
        raise UsageError(f"{ref.name!r} is a {found.kind} layer: only app layers are entitled")
    layer_svc.get_version(session, ref)  # it must exist now
    ent = Entitlement(
        layer_id=found.id,
        version=ref.version,
        user_id=to.id if to.kind == "user" else None,
        group_id=to.id if to.kind == "group" else None,
        machine_id=to.id if to.kind == "machine" else None,
        target=to.key,
        priority=priority,
    )
    _add_unique(session, ent, f"{ref.name} is already entitled to {to.kind} {to.name}")
    touch(session, _affected(session, to))
    audit.record(session, "entitle", layer, to=f"{to.kind} {to.name}", priority=priority)
    return ent


def unentitle(
    session: Session,
    *,
    layer: str | None = None,
    id: int | None = None,
    user: str | None = None,
    group: str | None = None,
    machine: str | None = None,
) -> Unentitled:
    """Take an entitlement back: number ``id`` (which must be ``layer``'s when a layer is
    given), or ``layer``'s to one target. The layer detaches live where it was attached."""
    if id is not None:
        ent = session.get(Entitlement, id)
        found = layer_svc.get_layer(session, layer) if layer is not None else None
        if ent is None or (found is not None and ent.layer_id != found.id):
            raise NotFound(f"{layer} has no entitlement {id}" if layer else f"no entitlement {id}")
        to = _target_of(session, ent)
        name = session.get_one(Layer, ent.layer_id).name
        session.delete(ent)
        session.flush()
        gone = 1
    else:
        if layer is None:
            raise UsageError("name the layer to unentitle")
        to = target(session, user=user, group=group, machine=machine)
        found = layer_svc.get_layer(session, parse_ref(layer, "layer name").name)
        name = found.name
        gone = session.execute(
            delete(Entitlement).where(
                and_(Entitlement.layer_id == found.id, Entitlement.target == to.key)
            )
        ).rowcount  # type: ignore[attr-defined]
        if not gone:
            raise NotFound(f"{found.name} is not entitled to {to.kind} {to.name}")
    touch(session, _affected(session, to))
    audit.record(session, "unentitle", name, to=f"{to.kind} {to.name}", removed=int(gone))
    return Unentitled.model_validate(
        {"layer": name, "kind": to.kind, "target": to.name, "removed": int(gone)}
    )


def _target_of(session: Session, ent: Entitlement) -> Target:
    if ent.user_id is not None:
        return Target("user", ent.user_id, session.get_one(User, ent.user_id).name)
    if ent.group_id is not None:
        return Target("group", ent.group_id, session.get_one(Group, ent.group_id).name)
    assert ent.machine_id is not None
    return Target("machine", ent.machine_id, session.get_one(Machine, ent.machine_id).name)


@dataclass(frozen=True, slots=True)
class EntitlementRow:
    id: int
    layer: str
    version: int | None
    kind: str
    target: str
    priority: int
    created_at: object


def list_entitlements(
    session: Session,
    *,
    layer: str | None = None,
    user: str | None = None,
    group: str | None = None,
    machine: str | None = None,
    id: int | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[EntitlementRow], int]:
    query = (
        select(
            Entitlement.id,
            Layer.name,
            Entitlement.version,
            Entitlement.target,
            Entitlement.priority,
            Entitlement.created_at,
            User.name,
            Group.name,
            Machine.name,
        )
        .join(Layer, Layer.id == Entitlement.layer_id)
        .outerjoin(User, User.id == Entitlement.user_id)
        .outerjoin(Group, Group.id == Entitlement.group_id)
        .outerjoin(Machine, Machine.id == Entitlement.machine_id)
    )
    if layer is not None:
        query = query.where(Layer.name == layer)
    if user is not None:
        query = query.where(User.name == user)
    if group is not None:
        query = query.where(Group.name == group)
    if machine is not None:
        query = query.where(Machine.name == machine)
    if id is not None:
        query = query.where(Entitlement.id == id)
    total = fleet.count_of(session, query)
    rows = session.execute(
        query.order_by(Layer.name, Entitlement.target).offset(offset).limit(limit)
    ).all()
    out = [
        EntitlementRow(
            i, lname, version, tkey.split(":")[0], uname or gname or mname or "", prio, created
        )
        for i, lname, version, tkey, prio, created, uname, gname, mname in rows
    ]
    return out, total


def entitlement_row(session: Session, *, id: int) -> EntitlementRow:
    rows, _ = list_entitlements(session, id=id, limit=1)
    if not rows:
        raise NotFound(f"no entitlement {id}")
    return rows[0]
