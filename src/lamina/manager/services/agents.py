"""What agents ask for: boot, login, logout, desired state, which layer data they may read.

These are the hot paths of a login storm, so they are SQLAlchemy Core on a connection in
one transaction each, a handful of indexed statements per call:

    boot     1 UPDATE + 1 SELECT (after the token lookup)
    login    user+writable SELECT, INSERT .. ON CONFLICT DO NOTHING, grants SELECT, change
    logout   session SELECT, DELETE, change (+ the writable version, ORM, when one is saved)

Writable layers are never attached twice: ``sessions.writable_id`` is unique, and a login
claims it with an insert that does nothing on conflict (PostgreSQL waits for a concurrent
claimer to commit or roll back before deciding), so of two racing logins exactly one wins.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    delete,
    func,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from lamina.errors import Conflict, InvalidInput, NotFound, Refused
from lamina.layer.importer import load_tree
from lamina.layer.records import WRITABLE, NewVersion
from lamina.manager.entitlements import Grant, layers_for
from lamina.manager.models import (
    Base,
    Change,
    Entitlement,
    Image,
    ImageVersion,
    Layer,
    LayerVersion,
    Machine,
    Membership,
    User,
    UserSession,
    WritableLayer,
)
from lamina.manager.services import layers as layer_svc
from lamina.manager.services import staged
from lamina.manager.services.machines import hash_token
from lamina.manager.services.readable import Readable
from lamina.names import parse_ref
from lamina.store import ChunkStore


def _t(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


M, U, S, W = _t(Machine), _t(User), _t(UserSession), _t(WritableLayer)
E, L, LV = _t(Entitlement), _t(Layer), _t(LayerVersion)
MS, C, IV, IM = _t(Membership), _t(Change), _t(ImageVersion), _t(Image)


@dataclass(frozen=True, slots=True)
class AgentMachine:
    id: int
    name: str
    image_version_id: int


# Statements are built once: building a select costs more than running it on SQLite
# (measured: a login spent 4.8 of its 6.4 ms constructing its union of three selects).
_BY_TOKEN = select(M.c.id, M.c.name, M.c.image_version_id).where(
    M.c.token_hash == bindparam("hash")
)
_TOUCH = C.insert().values(machine_id=bindparam("mid"), at=bindparam("at"))
_BOOTED = update(M).where(M.c.id == bindparam("mid")).values(last_boot_at=bindparam("at"))
_BOOT = (
    select(
        M.c.name,
        M.c.mode,
        M.c.hostname,
        M.c.domain,
        M.c.machine_id,
        M.c.mac,
        M.c.ssh_host_keys,
        M.c.network,
        M.c.identity_rev,
        IV.c.version,
        IV.c.manifest_id,
        IM.c.name.label("image"),
    )
    .join(IV, IV.c.id == M.c.image_version_id)
    .join(IM, IM.c.id == IV.c.image_id)
    .where(M.c.id == bindparam("mid"))
)


def by_token(conn: Connection, token: str) -> AgentMachine | None:
    row = conn.execute(_BY_TOKEN, {"hash": hash_token(token)}).first()
    return AgentMachine(row[0], row[1], row[2]) if row is not None else None


def _now() -> datetime:
    return datetime.now(UTC)


def _touch(conn: Connection, machine_id: int) -> None:
    conn.execute(_TOUCH, {"mid": machine_id, "at": _now()})


# -- boot -------------------------------------------------------------------------------------


def boot(conn: Connection, *, machine: AgentMachine) -> dict[str, Any]:
    conn.execute(_BOOTED, {"mid": machine.id, "at": _now()})
    row = conn.execute(_BOOT, {"mid": machine.id}).one()
    return {
        "machine": row.name,
        "mode": row.mode,
        "image": f"{row.image}@{row.version}",
        "image_manifest": row.manifest_id,
        "identity": {
            "hostname": row.hostname,
            "domain": row.domain,
            "fqdn": f"{row.hostname}.{row.domain}" if row.domain else row.hostname,
            "machine_id": row.machine_id,
            "mac": row.mac,
            "identity_rev": row.identity_rev,
            "ssh_host_keys": json.loads(row.ssh_host_keys or "{}"),
            "network": json.loads(row.network) if row.network else None,
        },
    }


# -- entitlements as they apply ---------------------------------------------------------------


def _latest(layer_id: Any) -> Any:
    newest = LV.alias("newest")
    return (
        select(func.max(newest.c.version))
        .where(newest.c.layer_id == layer_id)
        .correlate_except(newest)
        .scalar_subquery()
    )


def _grant_part(uid: Any, via: str, src: Any, where: Any) -> Any:
    version = func.coalesce(E.c.version, _latest(E.c.layer_id))
    return (
        select(
            uid.label("uid"),
            literal(via).label("via"),
            L.c.name,
            LV.c.version,
            LV.c.manifest_id,
            E.c.priority,
        )
        .select_from(src)
        .join(L, L.c.id == E.c.layer_id)
        .join(LV, and_(LV.c.layer_id == E.c.layer_id, LV.c.version == version))
        .where(where)
    )


_GRANTS_MACHINE = _grant_part(
    literal(None, type_=E.c.user_id.type), "machine", E, E.c.machine_id == bindparam("mid")
)
# The grants to the users logged in (bound as ``uids``): their own and their groups'.
_USER_GRANT_PARTS = (
    _grant_part(E.c.user_id, "user", E, E.c.user_id.in_(bindparam("uids", expanding=True))),
    _grant_part(
        MS.c.user_id,
        "group",
        MS.join(E, E.c.group_id == MS.c.group_id),
        MS.c.user_id.in_(bindparam("uids", expanding=True)),
    ),
)
_GRANTS = union_all(_GRANTS_MACHINE, *_USER_GRANT_PARTS)


def grants(conn: Connection, *, machine_id: int, user_ids: list[int]) -> list[Grant]:
    """Every entitlement that applies on this machine to these users (one round trip)."""
    if user_ids:
        rows = conn.execute(_GRANTS, {"mid": machine_id, "uids": user_ids}).all()
    else:
        rows = conn.execute(_GRANTS_MACHINE, {"mid": machine_id}).all()
    return [Grant(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]


def _layer_dicts(user_id: int, all_grants: list[Grant]) -> list[dict[str, Any]]:
    return [
        {
            "name": g.layer,
            "version": g.version,
            "ref": f"{g.layer}@{g.version}",
            "manifest": g.manifest,
            "via": g.via,
        }
        for g in layers_for(user_id, all_grants)
    ]


def _writable(name: str | None, policy: str | None, version: Any, manifest: Any) -> Any:
    if name is None:
        return None
    return {"name": name, "version": version, "manifest": manifest, "policy": policy}


# -- login / logout ---------------------------------------------------------------------------


_USER = (
    select(U.c.id, W.c.id, W.c.policy, L.c.name, L.c.id, LV.c.version, LV.c.manifest_id)
    .select_from(
        U.outerjoin(W, W.c.user_id == U.c.id)
        .outerjoin(L, L.c.id == W.c.layer_id)
        .outerjoin(LV, and_(LV.c.layer_id == L.c.id, LV.c.version == _latest(L.c.id)))
    )
    .where(U.c.name == bindparam("name"))
)
_INSERT = {
    name: dialect.insert(S)
    .values(
        user_id=bindparam("uid"),
        machine_id=bindparam("mid"),
        writable_id=bindparam("wid"),
        base_version=bindparam("base"),
        started_at=bindparam("at"),
    )
    .on_conflict_do_nothing()
    .returning(S.c.id)  # rowcount of a skipped insert was nonzero on psycopg: ask for the row
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_MINE = select(S.c.id, S.c.base_version).where(
    S.c.user_id == bindparam("uid"), S.c.machine_id == bindparam("mid")
)
_HOLDER = (
    select(M.c.name).join(S, S.c.machine_id == M.c.id).where(S.c.writable_id == bindparam("wid"))
)
_VERSION = select(LV.c.manifest_id).where(
    LV.c.layer_id == bindparam("lid"), LV.c.version == bindparam("v")
)


def _user(conn: Connection, name: str) -> Any:
    row = conn.execute(_USER, {"name": name}).first()
    if row is None:
        raise NotFound(f"no user named {name!r}")
    return row


def login(conn: Connection, *, machine: AgentMachine, user: str) -> dict[str, Any]:
    """Open ``user``'s session on the machine (again: the same session) and say what to
    mount. Conflict when the user's writable layer is in use on another machine."""
    uid, wid, policy, wname, wlayer, base, manifest = _user(conn, user)
    params = {"uid": uid, "mid": machine.id, "wid": wid, "base": base, "at": _now()}
    if conn.execute(_INSERT[conn.dialect.name], params).first() is not None:
        _touch(conn, machine.id)
    else:
        mine = conn.execute(_MINE, params).first()
        if mine is None:
            holder = conn.execute(_HOLDER, params).scalar()
            # None: the holder logged out in between; the agent retries.
            raise Conflict(f"{user}'s writable layer is in use on {holder or 'another machine'}")
        if mine[1] != base:  # logged in already: the session goes on from where it began
            base = mine[1]
            manifest = None
            if base is not None:
                manifest = conn.execute(_VERSION, {"lid": wlayer, "v": base}).scalar()
    all_grants = grants(conn, machine_id=machine.id, user_ids=[uid])
    return {
        "user": user,
        "layers": _layer_dicts(uid, all_grants),
        "writable": _writable(wname, policy, base, manifest),
    }


_MINE_LOCKED = _MINE.with_for_update()
_END = delete(S).where(S.c.id == bindparam("sid"))


def logout(
    conn: Connection,
    *,
    store: ChunkStore,
    machine: AgentMachine,
    user: str,
    saved: dict[str, Any] | None,
) -> dict[str, Any]:
    """End the session; record the writable layer's new version first when one was saved.
    Repeating a logout that went through answers the same (an agent retrying after a lost
    response); a saved version for a session that does not exist is refused."""
    uid, _wid, policy, wname, wlayer, wversion, wmanifest = _user(conn, user)
    # FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE already serializes writers.
    session = conn.execute(_MINE_LOCKED, {"uid": uid, "mid": machine.id}).first()
    if session is None:
        if saved is not None and wlayer is not None:
            if wmanifest == saved["manifest"]:
                return {"user": user, "ended": False, "saved": f"{wname}@{wversion}"}
            raise Conflict(f"{user} has no session on {machine.name}: nothing to save into")
        return {"user": user, "ended": False, "saved": None}
    ref = None
    if saved is not None and wname is not None:
        ref = _save(
            conn,
            store=store,
            machine=machine,
            name=wname,
            base=session[1],
            saved=saved | {"policy": policy},
        )
    conn.execute(_END, {"sid": session[0]})
    _touch(conn, machine.id)
    return {"user": user, "ended": True, "saved": ref}


def _save(
    conn: Connection,
    *,
    store: ChunkStore,
    machine: AgentMachine,
    name: str,
    base: int | None,
    saved: dict[str, Any],
) -> str:
    manifest = saved["manifest"]
    mid = bytes.fromhex(manifest)
    if not store.has(mid):
        raise InvalidInput(f"writable manifest {manifest[:16]} was not uploaded")
    named = load_tree(store, mid).referenced() | {mid}
    missing = [c for c in named if not store.has(c)]
    if missing:
        raise InvalidInput(f"{len(missing)} chunks of the writable layer were not uploaded")
    _check_named(conn, store, machine, named)
    with Session(bind=conn) as orm:
        layer = layer_svc.get_layer(orm, name)
        parent = None
        if base is not None:
            parent = orm.scalars(
                select(LayerVersion).where(
                    LayerVersion.layer_id == layer.id, LayerVersion.version == base
                )
            ).first()
        bases = []
        for text in saved.get("bases", []):
            try:
                bases.append(layer_svc.get_version(orm, parse_ref(text, "layer name")))
            except Exception:  # a base removed meanwhile: its ref is not recorded
                continue
        version = layer_svc.add_version(
            orm,
            name=name,
            kind=WRITABLE,
            new=NewVersion(
                mid,
                saved["files"],
                saved["size"],
                saved.get("stored_bytes", 0),
                f"session on {machine.name}",
            ),
            bases=bases,
            parent=parent,
            policy=saved.get("policy"),
        )
        orm.flush()
        return version.ref


_IMAGE_MANIFEST = select(IV.c.manifest_id).where(IV.c.id == bindparam("ivid"))


def _check_named(
    conn: Connection, store: ChunkStore, machine: AgentMachine, named: set[bytes]
) -> None:
    """A machine saves a layer version only with chunks it uploaded or may read already:
    naming a chunk is not enough to be given it (a forged manifest naming any chunk in
    the store would make it readable to the machine from then on). The chunks it
    uploaded are then off its upload account."""
    unproven = named - staged.held(conn, machine.id, named)
    if unproven:
        image = conn.execute(_IMAGE_MANIFEST, {"ivid": machine.image_version_id}).scalar_one()
        may = Readable(store, image, lambda: allowed_manifests(conn, machine_id=machine.id))
        unproven = {c for c in unproven if not may.allows(c)}
    if unproven:
        raise Refused(
            f"the writable layer names {len(unproven)} chunks that {machine.name} neither"
            f" uploaded nor may read (the first: {min(unproven).hex()[:16]})"
        )
    staged.claim(conn, machine.id, named)


# -- desired state ----------------------------------------------------------------------------


_IDENTITY_REVS = select(M.c.id, M.c.identity_rev).where(
    M.c.id.in_(bindparam("mids", expanding=True))
)
_SESSIONS_OF = (
    select(
        S.c.machine_id, U.c.id, U.c.name, W.c.policy, L.c.name, S.c.base_version, LV.c.manifest_id
    )
    .select_from(
        S.join(U, U.c.id == S.c.user_id)
        .outerjoin(W, W.c.id == S.c.writable_id)
        .outerjoin(L, L.c.id == W.c.layer_id)
        .outerjoin(LV, and_(LV.c.layer_id == L.c.id, LV.c.version == S.c.base_version))
    )
    .where(S.c.machine_id.in_(bindparam("mids", expanding=True)))
    .order_by(S.c.machine_id, U.c.name)
)
_MACHINE_GRANTS = _grant_part(
    E.c.machine_id, "machine", E, E.c.machine_id.in_(bindparam("mids", expanding=True))
)
_USER_GRANTS = union_all(*_USER_GRANT_PARTS)
# Ids per IN list: well under SQLite's 32,766 bound parameters.
BATCH = 500


def desired_many(conn: Connection, machines: list[AgentMachine]) -> dict[int, dict[str, Any]]:
    """``desired`` for many machines in a few queries: when one change to a group wakes
    10,000 long-polls, they are answered in batches rather than one transaction each."""
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(machines), BATCH):
        part = machines[start : start + BATCH]
        mids = [m.id for m in part]
        revs = {mid: rev for mid, rev in conn.execute(_IDENTITY_REVS, {"mids": mids})}
        rows = conn.execute(_SESSIONS_OF, {"mids": mids}).all()
        by_machine: dict[int, list[Grant]] = {}
        for r in conn.execute(_MACHINE_GRANTS, {"mids": mids}):
            by_machine.setdefault(r[0], []).append(Grant(None, r[1], r[2], r[3], r[4], r[5]))
        by_user: dict[int, list[Grant]] = {}
        uids = sorted({r[1] for r in rows})
        for i in range(0, len(uids), BATCH):
            for r in conn.execute(_USER_GRANTS, {"uids": uids[i : i + BATCH]}):
                by_user.setdefault(r[0], []).append(Grant(r[0], r[1], r[2], r[3], r[4], r[5]))
        sessions: dict[int, list[dict[str, Any]]] = {}
        for mid, uid, name, policy, wname, base, manifest in rows:
            applying = by_machine.get(mid, []) + by_user.get(uid, [])
            sessions.setdefault(mid, []).append(
                {
                    "user": name,
                    "layers": _layer_dicts(uid, applying),
                    "writable": _writable(wname, policy, base, manifest),
                }
            )
        for m in part:
            body = {
                "machine": m.name,
                "identity_rev": revs.get(m.id),
                "sessions": sessions.get(m.id, []),
            }
            rev = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
            out[m.id] = {"rev": rev[:32], **body}
    return out


def allowed_manifests(conn: Connection, *, machine_id: int) -> set[str]:
    """Manifests of the layer versions this machine may read: what is entitled to it and
    to its logged-in users, and those users' writable layers' versions."""
    user_ids = list(conn.scalars(select(S.c.user_id).where(S.c.machine_id == machine_id)))
    found = {g.manifest for g in grants(conn, machine_id=machine_id, user_ids=user_ids)}
    if user_ids:
        found |= set(
            conn.scalars(
                select(LV.c.manifest_id)
                .join(W, W.c.layer_id == LV.c.layer_id)
                .where(W.c.user_id.in_(user_ids))
            )
        )
    if found:  # and the EROFS images of those versions (lazily attached layers)
        found |= {
            i
            for i in conn.scalars(
                select(LV.c.image_manifest_id).where(LV.c.manifest_id.in_(sorted(found)))
            )
            if i is not None
        }
    return found


def changes_since(conn: Connection, last: int | None) -> tuple[int, set[int] | None]:
    """(highest change id, machines whose desired state changed since ``last``; None for
    "maybe every machine"). Layer versions count as changes for everyone (an entitlement
    may follow a layer's latest version)."""
    top = conn.execute(select(func.max(C.c.id))).scalar() or 0
    if last is None or top <= last:
        return top, set()
    ids = list(conn.scalars(select(C.c.machine_id).where(C.c.id > last).distinct()))
    return top, (None if None in ids else set(ids))


def layer_versions_mark(conn: Connection) -> tuple[int, int]:
    top, count = conn.execute(select(func.max(LV.c.id), func.count()).select_from(LV)).one()
    return int(top or 0), int(count)


def prune_changes(conn: Connection, *, older_than: datetime) -> None:
    conn.execute(delete(C).where(C.c.at < older_than))
