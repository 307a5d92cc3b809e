"""The admin API (admin token): users, groups, entitlements, machines, images, layers,
sessions. Lists page and filter on the server (``offset``, ``limit``, ``q`` and per-kind
filters) and answer ``{"items", "total", "offset", "limit"}``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, status

from lamina.delta import uploads
from lamina.manager import schemas as s
from lamina.manager.deps import AdminDep, HomeDep, SessionDep
from lamina.manager.services import access, fleet, images, layers, machines
from lamina.names import NAME_PATTERN, USER_PATTERN, Ref

router = APIRouter(prefix="/api/v1", tags=["admin"])

Offset = Annotated[int, Query(ge=0, le=10_000_000)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Filter = Annotated[str, Query(max_length=100)]
NameP = Annotated[str, Path(pattern=USER_PATTERN)]
ObjP = Annotated[str, Path(pattern=NAME_PATTERN)]
OptName = Annotated[str | None, Query(pattern=USER_PATTERN)]
OptObj = Annotated[str | None, Query(pattern=NAME_PATTERN)]
ERRORS: dict[int | str, dict[str, Any]] = {401: {}, 403: {}, 404: {}, 409: {}}


def _page(items: list[Any], total: int, offset: int, limit: int) -> dict[str, Any]:
    return {"items": items, "total": total, "offset": offset, "limit": limit}


# -- users ------------------------------------------------------------------------------------


def _user(row: access.UserRow) -> s.UserPublic:
    return s.UserPublic(
        name=row.user.name,
        groups=row.groups,
        writable=row.writable,
        policy=row.policy,
        writable_version=row.writable_version,
        in_use_on=row.in_use_on,
        created_at=row.user.created_at,
    )


@router.get("/users", response_model=s.Page[s.UserPublic], responses=ERRORS)
def list_users(
    _: AdminDep,
    session: SessionDep,
    offset: Offset = 0,
    limit: Limit = 100,
    q: Filter = "",
    group: OptName = None,
) -> dict[str, Any]:
    rows, total = access.list_users(session, offset=offset, limit=limit, q=q, group=group)
    return _page([_user(r) for r in rows], total, offset, limit)


@router.post("/users", status_code=201, response_model=s.UserPublic, responses=ERRORS)
def create_user(_: AdminDep, session: SessionDep, body: s.UserCreate) -> s.UserPublic:
    access.add_user(session, name=body.name, groups=body.groups, policy=body.policy)
    return _user(access.user_row(session, body.name))


@router.get("/users/{name}", response_model=s.UserPublic, responses=ERRORS)
def get_user(_: AdminDep, session: SessionDep, name: NameP) -> s.UserPublic:
    return _user(access.user_row(session, name))


@router.patch("/users/{name}", response_model=s.UserPublic, responses=ERRORS)
def update_user(_: AdminDep, session: SessionDep, name: NameP, body: s.UserUpdate) -> s.UserPublic:
    access.update_user(session, name=name, policy=body.policy, groups=body.groups)
    return _user(access.user_row(session, name))


@router.delete("/users/{name}", status_code=204, responses=ERRORS)
def delete_user(_: AdminDep, session: SessionDep, name: NameP) -> Response:
    access.remove_user(session, name=name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- groups -----------------------------------------------------------------------------------


@router.get("/groups", response_model=s.Page[s.GroupPublic], responses=ERRORS)
def list_groups(
    _: AdminDep, session: SessionDep, offset: Offset = 0, limit: Limit = 100, q: Filter = ""
) -> dict[str, Any]:
    rows, total = access.list_groups(session, offset=offset, limit=limit, q=q)
    items = [s.GroupPublic(name=g.name, members=n, created_at=g.created_at) for g, n in rows]
    return _page(items, total, offset, limit)


@router.post("/groups", status_code=201, response_model=s.GroupPublic, responses=ERRORS)
def create_group(_: AdminDep, session: SessionDep, body: s.GroupCreate) -> s.GroupPublic:
    g = access.add_group(session, name=body.name)
    return s.GroupPublic(name=g.name, members=0, created_at=g.created_at)


@router.delete("/groups/{name}", status_code=204, responses=ERRORS)
def delete_group(_: AdminDep, session: SessionDep, name: NameP) -> Response:
    access.remove_group(session, name=name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/groups/{name}/members", status_code=204, responses=ERRORS)
def add_member(_: AdminDep, session: SessionDep, name: NameP, body: s.MemberCreate) -> Response:
    access.add_member(session, group=name, user=body.user)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete("/groups/{name}/members/{user}", status_code=204, responses=ERRORS)
def remove_member(_: AdminDep, session: SessionDep, name: NameP, user: NameP) -> Response:
    access.remove_member(session, group=name, user=user)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- entitlements -----------------------------------------------------------------------------


def _ent(row: access.EntitlementRow) -> s.EntitlementPublic:
    return s.EntitlementPublic.model_validate(row, from_attributes=True)


@router.get("/entitlements", response_model=s.Page[s.EntitlementPublic], responses=ERRORS)
def list_entitlements(
    _: AdminDep,
    session: SessionDep,
    offset: Offset = 0,
    limit: Limit = 100,
    layer: OptObj = None,
    user: OptName = None,
    group: OptName = None,
    machine: OptObj = None,
) -> dict[str, Any]:
    rows, total = access.list_entitlements(
        session,
        layer=layer,
        user=user,
        group=group,
        machine=machine,
        offset=offset,
        limit=limit,
    )
    return _page([_ent(r) for r in rows], total, offset, limit)


@router.post("/entitlements", status_code=201, response_model=s.EntitlementPublic, responses=ERRORS)
def create_entitlement(
    _: AdminDep, session: SessionDep, body: s.EntitlementCreate
) -> s.EntitlementPublic:
    to = access.target(session, user=body.user, group=body.group, machine=body.machine)
    ent = access.entitle(session, layer=body.layer, to=to, priority=body.priority)
    layer = body.layer.partition("@")[0]
    return _ent(
        access.EntitlementRow(
            ent.id, layer, ent.version, to.kind, to.name, ent.priority, ent.created_at
        )
    )


@router.delete("/entitlements/{id}", status_code=204, responses=ERRORS)
def delete_entitlement(
    _: AdminDep, session: SessionDep, id: Annotated[int, Path(ge=1, le=2**31 - 1)]
) -> Response:
    access.remove_entitlement(session, id=id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete("/entitlements", response_model=s.Removed, responses=ERRORS)
def unentitle(
    _: AdminDep,
    session: SessionDep,
    layer: Annotated[str, Query(pattern=NAME_PATTERN)],
    user: OptName = None,
    group: OptName = None,
    machine: OptObj = None,
) -> s.Removed:
    to = access.target(session, user=user, group=group, machine=machine)
    return s.Removed(removed=access.unentitle(session, layer=layer, to=to))


# -- machines ---------------------------------------------------------------------------------


def _machine(m: Any, users: list[str]) -> dict[str, Any]:
    return {
        "name": m.name,
        "image": m.image_version.ref,
        "mode": m.mode,
        "hostname": m.hostname,
        "fqdn": m.fqdn,
        "mac": m.mac,
        "identity_rev": m.identity_rev,
        "last_boot_at": m.last_boot_at,
        "users": users,
        "created_at": m.created_at,
    }


@router.get("/machines", response_model=s.Page[s.MachinePublic], responses=ERRORS)
def list_machines(
    _: AdminDep,
    session: SessionDep,
    offset: Offset = 0,
    limit: Limit = 100,
    q: Filter = "",
    image: OptObj = None,
) -> dict[str, Any]:
    rows, total = fleet.list_machines(session, offset=offset, limit=limit, q=q, image=image)
    users = fleet.users_on(session, [m.id for m in rows])
    return _page([_machine(m, users.get(m.id, [])) for m in rows], total, offset, limit)


@router.post("/machines", status_code=201, response_model=s.MachineCreated, responses=ERRORS)
def create_machine(_: AdminDep, session: SessionDep, body: s.MachineCreate) -> dict[str, Any]:
    added = machines.add(
        session, name=body.name, image=body.image, mode=body.mode, hostname=body.hostname
    )
    session.flush()
    return _machine(added.machine, []) | {"token": added.token}


@router.get("/machines/{name}", response_model=s.MachinePublic, responses=ERRORS)
def get_machine(_: AdminDep, session: SessionDep, name: ObjP) -> dict[str, Any]:
    m = machines.get(session, name)
    return _machine(m, fleet.users_on(session, [m.id]).get(m.id, []))


@router.patch("/machines/{name}", response_model=s.MachinePublic, responses=ERRORS)
def update_machine(
    _: AdminDep, session: SessionDep, home: HomeDep, name: ObjP, body: s.MachineUpdate
) -> dict[str, Any]:
    if body.mode is not None:
        m = machines.set_mode(session, name=name, mode=body.mode, home=home)
    else:
        m = machines.get(session, name)
    return _machine(m, fleet.users_on(session, [m.id]).get(m.id, []))


@router.delete("/machines/{name}", status_code=204, responses=ERRORS)
def delete_machine(_: AdminDep, session: SessionDep, home: HomeDep, name: ObjP) -> Response:
    import shutil

    machines.get(session, name)
    uploads.discard_delta(home, name)  # refuses while the machine has its disk open
    machines.remove(session, name=name)
    session.flush()
    shutil.rmtree(home.deltas_dir / name, ignore_errors=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- images and layers ------------------------------------------------------------------------


def _image(image: Any, versions: list[fleet.VersionRow]) -> s.ImagePublic:
    return s.ImagePublic(
        name=image.name,
        created_at=image.created_at,
        versions=[
            s.ImageVersionPublic(
                version=v.version.version,
                ref=f"{image.name}@{v.version.version}",
                size=v.version.size,
                stored_bytes=v.version.stored_bytes,
                machines=v.machines,
                created_at=v.version.created_at,
            )
            for v in versions
        ],
    )


@router.get("/images", response_model=s.Page[s.ImagePublic], responses=ERRORS)
def list_images(
    _: AdminDep, session: SessionDep, offset: Offset = 0, limit: Limit = 100, q: Filter = ""
) -> dict[str, Any]:
    rows, total = fleet.list_images(session, offset=offset, limit=limit, q=q)
    return _page([_image(i, v) for i, v in rows], total, offset, limit)


@router.delete("/images/{name}", status_code=204, responses=ERRORS)
def delete_image(
    _: AdminDep,
    session: SessionDep,
    name: ObjP,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    fleet.check_image_unpinned(session, name=name, version=version)
    images.remove(session, ref=Ref(name, version))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _layer(layer: Any, entitled: int) -> s.LayerPublic:
    return s.LayerPublic(
        name=layer.name,
        kind=layer.kind,
        entitlements=entitled,
        created_at=layer.created_at,
        versions=[
            s.LayerVersionPublic(
                version=v.version,
                ref=f"{layer.name}@{v.version}",
                files=v.files,
                size=v.size,
                stored_bytes=v.stored_bytes,
                policy=v.policy,
                created_at=v.created_at,
            )
            for v in layer.versions
        ],
    )


@router.get("/layers", response_model=s.Page[s.LayerPublic], responses=ERRORS)
def list_layers(
    _: AdminDep,
    session: SessionDep,
    offset: Offset = 0,
    limit: Limit = 100,
    q: Filter = "",
    kind: Annotated[str | None, Query(pattern="^(app|writable)$")] = None,
) -> dict[str, Any]:
    rows, total = fleet.list_layers(session, offset=offset, limit=limit, q=q, kind=kind)
    return _page([_layer(la, n) for la, n in rows], total, offset, limit)


@router.delete("/layers/{name}", status_code=204, responses=ERRORS)
def delete_layer(
    _: AdminDep,
    session: SessionDep,
    name: ObjP,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    fleet.check_layer_unused(session, layer=layers.get_layer(session, name))
    layers.remove(session, ref=Ref(name, version))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- sessions ---------------------------------------------------------------------------------


@router.get("/sessions", response_model=s.Page[s.SessionPublic], responses=ERRORS)
def list_sessions(
    _: AdminDep,
    session: SessionDep,
    offset: Offset = 0,
    limit: Limit = 100,
    user: OptName = None,
    machine: OptObj = None,
) -> dict[str, Any]:
    rows, total = fleet.list_sessions(
        session, offset=offset, limit=limit, user=user, machine=machine
    )
    items = [s.SessionPublic.model_validate(r, from_attributes=True) for r in rows]
    return _page(items, total, offset, limit)
