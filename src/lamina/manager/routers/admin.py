"""The admin API (admin token): users, groups, entitlements, machines, images, layers,
sessions. Lists page and filter on the server (``offset``, ``limit``, ``q`` and per-kind
filters) and answer ``{"items", "total", "offset", "limit"}``.

Operations go through ``HomeAdmin`` (``lamina.manager.admin``), as the CLI on a home and
the console do: a route parses and answers, the service holds the rules. A change that
would lose data answers 409 with kind ``Unconfirmed`` until it is repeated with
``?force=true``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response, status

from lamina.manager import schemas as s
from lamina.manager import views
from lamina.manager.admin import HomeAdmin
from lamina.manager.deps import AdminDep, HomeDep, SessionDep
from lamina.manager.services import access, fleet
from lamina.names import NAME_PATTERN, USER_PATTERN

router = APIRouter(prefix="/api/v1", tags=["admin"])

Offset = Annotated[int, Query(ge=0, le=10_000_000)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Filter = Annotated[str, Query(max_length=100)]
NameP = Annotated[str, Path(pattern=USER_PATTERN)]
ObjP = Annotated[str, Path(pattern=NAME_PATTERN)]
OptName = Annotated[str | None, Query(pattern=USER_PATTERN)]
OptObj = Annotated[str | None, Query(pattern=NAME_PATTERN)]
Version = Annotated[int | None, Query(ge=1, le=2**31 - 1)]
Force = Annotated[bool, Query(description="Confirm a change that loses data.")]
ERRORS: dict[int | str, dict[str, Any]] = {401: {}, 403: {}, 404: {}, 409: {}}


def get_admin(caller: AdminDep, home: HomeDep) -> HomeAdmin:
    return HomeAdmin(home, caller.actor())


Ops = Annotated[HomeAdmin, Depends(get_admin)]


def _page(items: list[Any], total: int, offset: int, limit: int) -> dict[str, Any]:
    return {"items": items, "total": total, "offset": offset, "limit": limit}


def _no_content() -> Response:
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- users ------------------------------------------------------------------------------------


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
    return _page([views.user(r) for r in rows], total, offset, limit)


@router.post("/users", status_code=201, response_model=s.UserPublic, responses=ERRORS)
def create_user(ops: Ops, body: s.UserCreate) -> s.UserPublic:
    return ops.add_user(body)


@router.get("/users/{name}", response_model=s.UserPublic, responses=ERRORS)
def get_user(_: AdminDep, session: SessionDep, name: NameP) -> s.UserPublic:
    return views.user(access.user_row(session, name))


@router.patch("/users/{name}", response_model=s.UserPublic, responses=ERRORS)
def update_user(ops: Ops, name: NameP, body: s.UserUpdate) -> s.UserPublic:
    return ops.change_user(name, body)


@router.delete("/users/{name}", status_code=204, responses=ERRORS)
def delete_user(ops: Ops, name: NameP) -> Response:
    ops.remove_user(name)
    return _no_content()


# -- groups -----------------------------------------------------------------------------------


@router.get("/groups", response_model=s.Page[s.GroupPublic], responses=ERRORS)
def list_groups(
    _: AdminDep, session: SessionDep, offset: Offset = 0, limit: Limit = 100, q: Filter = ""
) -> dict[str, Any]:
    rows, total = access.list_groups(session, offset=offset, limit=limit, q=q)
    return _page([views.group(g, n) for g, n in rows], total, offset, limit)


@router.post("/groups", status_code=201, response_model=s.GroupPublic, responses=ERRORS)
def create_group(ops: Ops, body: s.GroupCreate) -> s.GroupPublic:
    return ops.add_group(body)


@router.delete("/groups/{name}", status_code=204, responses=ERRORS)
def delete_group(ops: Ops, name: NameP) -> Response:
    ops.remove_group(name)
    return _no_content()


@router.post("/groups/{name}/members", status_code=204, responses=ERRORS)
def add_member(ops: Ops, name: NameP, body: s.MemberCreate) -> Response:
    ops.add_member(name, body)
    return _no_content()


@router.delete("/groups/{name}/members/{user}", status_code=204, responses=ERRORS)
def remove_member(ops: Ops, name: NameP, user: NameP) -> Response:
    ops.remove_member(name, user)
    return _no_content()


# -- entitlements -----------------------------------------------------------------------------


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
        session, layer=layer, user=user, group=group, machine=machine, offset=offset, limit=limit
    )
    return _page([views.entitlement(r) for r in rows], total, offset, limit)


@router.post("/entitlements", status_code=201, response_model=s.EntitlementPublic, responses=ERRORS)
def create_entitlement(ops: Ops, body: s.EntitlementCreate) -> s.EntitlementPublic:
    return ops.entitle(body)


@router.delete("/entitlements/{id}", response_model=s.Unentitled, responses=ERRORS)
def delete_entitlement(
    ops: Ops, id: Annotated[int, Path(ge=1, le=2**31 - 1)], layer: OptObj = None
) -> s.Unentitled:
    return ops.remove_entitlement(id, layer=layer)


@router.delete("/entitlements", response_model=s.Unentitled, responses=ERRORS)
def unentitle(
    ops: Ops,
    layer: Annotated[str, Query(pattern=NAME_PATTERN)],
    user: OptName = None,
    group: OptName = None,
    machine: OptObj = None,
) -> s.Unentitled:
    return ops.unentitle(layer, user=user, group=group, machine=machine)


# -- machines ---------------------------------------------------------------------------------


@router.get("/machines", response_model=s.Page[s.MachinePublic], responses=ERRORS)
def list_machines(
    _: AdminDep,
    session: SessionDep,
    offset: Offset = 0,
    limit: Limit = 100,
    q: Filter = "",
    image: OptObj = None,
    mode: s.Mode | None = None,
    state: Literal["new", "booted", "in-use"] | None = None,
) -> dict[str, Any]:
    """``state``: never booted (new), booted, or with a user logged in (in-use)."""
    rows, total = fleet.list_machines(
        session, offset=offset, limit=limit, q=q, image=image, mode=mode, state=state
    )
    users = fleet.users_on(session, [m.id for m in rows])
    return _page([views.machine(m, users.get(m.id, [])) for m in rows], total, offset, limit)


@router.post("/machines", status_code=201, response_model=s.MachineCreated, responses=ERRORS)
def create_machine(ops: Ops, body: s.MachineCreate) -> s.MachineCreated:
    return ops.add_machine(body)


@router.get("/machines/{name}", response_model=s.MachineDetail, responses=ERRORS)
def get_machine(ops: Ops, name: ObjP) -> s.MachineDetail:
    return ops.show_machine(name)


@router.patch("/machines/{name}", response_model=s.MachineDetail, responses=ERRORS)
def update_machine(
    ops: Ops, name: ObjP, body: s.MachineUpdate, force: Force = False
) -> s.MachineDetail:
    return ops.change_machine(name, body, force=force)


@router.post("/machines/{name}/reset", response_model=s.MachineReset, responses=ERRORS)
def reset_machine(ops: Ops, name: ObjP, force: Force = False) -> s.MachineReset:
    return ops.reset_machine(name, force=force)


@router.post("/machines/{name}/commit", response_model=s.DeltaCommitted, responses=ERRORS)
def commit_delta(ops: Ops, name: ObjP, body: s.DeltaCommit) -> s.DeltaCommitted:
    return ops.commit_delta(name, body)


@router.post("/machines/{name}/move", response_model=s.MachineMoved, responses=ERRORS)
def move_machine(ops: Ops, name: ObjP, body: s.MachineMove, force: Force = False) -> s.MachineMoved:
    """Serve the machine from block server ``to`` from its next boot (a stateful machine:
    on the manager of its server's home, its delta committed as NAME.state@N)."""
    return ops.move_machine(name, body, force=force)


@router.delete("/machines/{name}", response_model=s.MachineRemoved, responses=ERRORS)
def delete_machine(ops: Ops, name: ObjP, force: Force = False) -> s.MachineRemoved:
    return ops.remove_machine(name, force=force)


# -- images and layers ------------------------------------------------------------------------


@router.get("/images", response_model=s.Page[s.ImagePublic], responses=ERRORS)
def list_images(
    _: AdminDep, session: SessionDep, offset: Offset = 0, limit: Limit = 100, q: Filter = ""
) -> dict[str, Any]:
    rows, total = fleet.list_images(session, offset=offset, limit=limit, q=q)
    return _page([views.image(i, v) for i, v in rows], total, offset, limit)


@router.delete("/images/{name}", response_model=s.VersionsRemoved, responses=ERRORS)
def delete_image(ops: Ops, name: ObjP, version: Version = None) -> s.VersionsRemoved:
    return ops.remove_image(name if version is None else f"{name}@{version}")


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
    return _page([views.layer(la, n) for la, n in rows], total, offset, limit)


@router.delete("/layers/{name}", response_model=s.VersionsRemoved, responses=ERRORS)
def delete_layer(
    ops: Ops, name: ObjP, version: Version = None, force: Force = False
) -> s.VersionsRemoved:
    return ops.remove_layer(name if version is None else f"{name}@{version}", force=force)


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
