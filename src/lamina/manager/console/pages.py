"""Console pages (GET): dashboard, machines, images, layers, users, groups, the audit log.

Every list is paged and filtered in the database (``page``, ``per``, ``q`` and per-page
filters), so a page costs the same at 10 machines and at 10,000.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from lamina.errors import NotFound
from lamina.home import Home
from lamina.manager import history
from lamina.manager.console import auth
from lamina.manager.console.params import (
    GroupName,
    ImagePagingDep,
    Kind,
    Mode,
    ObjName,
    Order,
    Paging,
    PagingDep,
    Sort,
    Text,
    ViewDep,
)
from lamina.manager.services import access, audit, fleet, images, layers, netboot, servers
from lamina.manager.services import console as svc
from lamina.manager.services import console_access as people
from lamina.names import MACHINE_PREFIX
from lamina.units import human_bytes

NEW_DEVICES = 20  # the newest few MACs that asked to boot, under the machines

router = APIRouter()


def page_machines(
    db: Session,
    home: Home,
    paging: Paging,
    *,
    image: str,
    mode: str,
    sort: str = "",
    order: str = "",
) -> tuple[list[svc.MachineRow], int]:
    """The machines page's rows: one page, filtered and sorted as its form says."""
    return svc.list_machines(
        db,
        deltas=home.deltas_dir,
        offset=paging.offset,
        limit=paging.per,
        q=paging.q,
        image=image or None,
        mode=mode or None,
        sort=sort or "name",
        descending=order == "desc",
    )


def page_users(
    db: Session, paging: Paging, *, group: str
) -> tuple[list[access.UserRow], int, dict[int, people.UserExtra], str | None]:
    """The users page's rows and their extras, or why there are none (an unknown group)."""
    try:
        rows, total = access.list_users(
            db, offset=paging.offset, limit=paging.per, q=paging.q, group=group or None
        )
    except NotFound as exc:
        return [], 0, {}, str(exc)
    extras = people.user_extras(db, user_ids=[r.user.id for r in rows])
    return rows, total, extras, None


@router.get("/", response_class=HTMLResponse)
def dashboard(view: ViewDep) -> HTMLResponse:
    home = view.home
    with home.session() as db:
        d = svc.dashboard(db, store=home.store, deltas=home.deltas_dir)
    state = view.request.app.state
    nbd = state.nbd_totals() if state.nbd_totals is not None else None
    now = history.now_sample(nbd.boots if nbd else 0, nbd.read_bytes() if nbd else 0, d.store_bytes)
    charts = history.charts(state.history, now)
    return view.page(
        "dashboard.html",
        d=d,
        charts=charts,
        chart_captions=[
            f"boots: {now.boots}",
            f"bytes served: {human_bytes(now.read_bytes)}",
            f"store: {human_bytes(now.store_bytes)}",
        ],
        live="/live/dashboard",
    )


@router.get("/machines", response_class=HTMLResponse)
def machines_page(
    view: ViewDep,
    paging: PagingDep,
    image: Text = "",
    mode: Mode = "",
    sort: Sort = "",
    order: Order = "",
) -> HTMLResponse:
    with view.home.session() as db:
        rows, total = page_machines(
            db, view.home, paging, image=image, mode=mode, sort=sort, order=order
        )
        versions = svc.versions_of(db, images=[r.image_name for r in rows])
        names = svc.image_names(db)
        new = netboot.new_devices(db, limit=NEW_DEVICES)  # MACs that asked to boot
    p = view.pager(paging, total, q=paging.q, image=image, mode=mode, sort=sort, order=order)
    return view.page(
        "machines.html",
        rows=rows,
        versions=versions,
        image_names=names,
        clients=view.clients(),
        q=paging.q,
        image=image,
        mode=mode,
        sort=sort or "name",
        order=order or "asc",
        p=p,
        new_devices=new,
        live=f"/live/machines?{p.query()}",
    )


@router.get("/machines/{name}", response_class=HTMLResponse)
def machine_page(view: ViewDep, name: ObjName) -> HTMLResponse:
    try:
        with view.home.session() as db:
            detail = svc.machine_detail(db, deltas=view.home.deltas_dir, name=name)
            versions = svc.versions_of(db, images=[detail.row.image_name])
            here = detail.server.name if detail.server is not None else None
            movable = [
                s.name for s in servers.all_servers(db) if servers.is_live(s) and s.name != here
            ]
    except NotFound as exc:
        return view.missing(str(exc))
    return view.page(
        "machine.html",
        m=detail,
        versions=versions.get(detail.row.image_name, []),
        movable=movable,
        client=view.clients().get(name),
        nbd_url=view.nbd_url(f"{MACHINE_PREFIX}{name}"),
        seed_url=view.nbd_url(f"{MACHINE_PREFIX}{name}/seed"),
        nbd=view.nbd_endpoint(),
        live=f"/live/machines?name={name}",
    )


@router.get("/images", response_class=HTMLResponse)
def images_page(view: ViewDep, paging: ImagePagingDep) -> HTMLResponse:
    with view.home.session() as db:
        rows, total = fleet.list_images(db, offset=paging.offset, limit=paging.per, q=paging.q)
        usage = images.version_bytes(db, store=view.home.store)
    p = view.pager(paging, total, q=paging.q)
    return view.page(
        "images.html", rows=rows, usage=usage, q=paging.q, p=p, live=f"/live/images?{p.query()}"
    )


@router.get("/layers", response_class=HTMLResponse)
def layers_page(view: ViewDep, paging: PagingDep, kind: Kind = "") -> HTMLResponse:
    with view.home.session() as db:
        rows, total = fleet.list_layers(
            db, offset=paging.offset, limit=paging.per, q=paging.q, kind=kind or None
        )
    p = view.pager(paging, total, q=paging.q, kind=kind)
    return view.page("layers.html", rows=rows, q=paging.q, kind=kind, p=p)


@router.get("/layers/{name}", response_class=HTMLResponse)
def layer_page(view: ViewDep, paging: PagingDep, name: ObjName) -> HTMLResponse:
    try:
        with view.home.session() as db:
            layer = layers.get_layer(db, name)
            versions = people.layer_versions(db, name=name)
            ents, total = access.list_entitlements(
                db, layer=name, offset=paging.offset, limit=paging.per
            )
    except NotFound as exc:
        return view.missing(str(exc))
    return view.page(
        "layer.html",
        layer=layer,
        versions=versions,
        entitlements=ents,
        p=view.pager(paging, total),
    )


@router.get("/users", response_class=HTMLResponse)
def users_page(view: ViewDep, paging: PagingDep, group: GroupName = "") -> HTMLResponse:
    with view.home.session() as db:
        rows, total, extras, error = page_users(db, paging, group=group)
        flashes = auth.take_flashes(db, view.console)
    if error:
        flashes.append(("error", error))
    p = view.pager(paging, total, q=paging.q, group=group)
    return view.render(
        "users.html",
        flashes,
        rows=rows,
        extras=extras,
        q=paging.q,
        group=group,
        p=p,
        live=f"/live/users?{p.query()}",
    )


@router.get("/groups", response_class=HTMLResponse)
def groups_page(view: ViewDep, paging: PagingDep) -> HTMLResponse:
    with view.home.session() as db:
        rows, total = access.list_groups(db, offset=paging.offset, limit=paging.per, q=paging.q)
        ids = [g.id for g, _n in rows]
        members = people.group_members(db, group_ids=ids)
        entitled = people.group_layers(db, group_ids=ids)
    p = view.pager(paging, total, q=paging.q)
    return view.page(
        "groups.html",
        rows=rows,
        members=members,
        layers=entitled,
        q=paging.q,
        p=p,
        live=f"/live/groups?{p.query()}",
    )


@router.get("/audit", response_class=HTMLResponse)
def audit_page(view: ViewDep, q: Text = "") -> HTMLResponse:
    """The newest 200 entries of the audit log, those whose actor, action or target hold
    ``q`` when given."""
    with view.home.session() as db:
        rows = [audit.as_dict(e) for e in audit.entries(db, limit=200, q=q or None)]
    return view.page("audit.html", rows=rows, q=q)
