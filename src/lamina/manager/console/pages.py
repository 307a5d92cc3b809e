"""Console pages (GET): dashboard, machines, images, layers, users and groups.

Every list is paged and filtered in the database (``page``, ``per``, ``q`` and per-page
filters), so a page costs the same at 10 machines and at 10,000.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from lamina.errors import NotFound
from lamina.home import Home
from lamina.manager.console import auth
from lamina.manager.console.render import DEFAULT_PER, Pager, render
from lamina.manager.deps import HomeDep
from lamina.manager.services import access, fleet, layers
from lamina.manager.services import console as svc
from lamina.manager.services import console_access as people

router = APIRouter()

PageNo = Annotated[int, Query(ge=1, le=1_000_000)]
Per = Annotated[int, Query(ge=1, le=500)]
Text = Annotated[str, Query(max_length=100)]
ObjName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
Mode = Annotated[str, Query(pattern="^(|stateless|stateful)$")]
Kind = Annotated[str, Query(pattern="^(|app|writable)$")]


def _page(
    request: Request,
    home: Home,
    console: auth.ConsoleSession,
    template: str,
    **context: Any,
) -> HTMLResponse:
    with home.session() as db:
        flashes = auth.take_flashes(db, console)
    return render(request, template, csrf=console.csrf, flashes=flashes, **context)


def _missing(request: Request, home: Home, console: auth.ConsoleSession, text: str) -> HTMLResponse:
    with home.session() as db:
        flashes = [*auth.take_flashes(db, console), ("error", text)]
    return render(request, "missing.html", status_code=404, csrf=console.csrf, flashes=flashes)


def _pager(request: Request, page: int, per: int, total: int, **filters: str) -> Pager:
    return Pager(page, per, total, request.url.path, filters)


def page_machines(
    db: Session, home: Home, *, page: int, per: int, q: str, image: str, mode: str
) -> tuple[list[svc.MachineRow], int]:
    """The machines page's rows: one page, filtered as its form says."""
    return svc.list_machines(
        db,
        deltas=home.deltas_dir,
        offset=(page - 1) * per,
        limit=per,
        q=q,
        image=image or None,
        mode=mode or None,
    )


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, home: HomeDep, console: auth.ConsoleDep) -> HTMLResponse:
    with home.session() as db:
        d = svc.dashboard(db, store=home.store, deltas=home.deltas_dir)
    return _page(request, home, console, "dashboard.html", d=d, live="/live/dashboard")


@router.get("/machines", response_class=HTMLResponse)
def machines_page(
    request: Request,
    home: HomeDep,
    console: auth.ConsoleDep,
    page: PageNo = 1,
    per: Per = DEFAULT_PER,
    q: Text = "",
    image: Text = "",
    mode: Mode = "",
) -> HTMLResponse:
    with home.session() as db:
        rows, total = page_machines(db, home, page=page, per=per, q=q, image=image, mode=mode)
        versions = svc.versions_of(db, images=[r.image_name for r in rows])
        names = svc.image_names(db)
    p = _pager(request, page, per, total, q=q, image=image, mode=mode)
    return _page(
        request,
        home,
        console,
        "machines.html",
        rows=rows,
        versions=versions,
        image_names=names,
        q=q,
        image=image,
        mode=mode,
        p=p,
        live=f"/live/machines?{p.query()}",
    )


@router.get("/machines/{name}", response_class=HTMLResponse)
def machine_page(
    request: Request, home: HomeDep, console: auth.ConsoleDep, name: ObjName
) -> HTMLResponse:
    try:
        with home.session() as db:
            detail = svc.machine_detail(db, deltas=home.deltas_dir, name=name)
    except NotFound as exc:
        return _missing(request, home, console, str(exc))
    return _page(
        request, home, console, "machine.html", m=detail, live=f"/live/machines?name={name}"
    )


@router.get("/images", response_class=HTMLResponse)
def images_page(
    request: Request,
    home: HomeDep,
    console: auth.ConsoleDep,
    page: PageNo = 1,
    per: Annotated[int, Query(ge=1, le=200)] = 20,
    q: Text = "",
) -> HTMLResponse:
    with home.session() as db:
        rows, total = fleet.list_images(db, offset=(page - 1) * per, limit=per, q=q)
        usage = svc.version_bytes(db, store=home.store)
    p = _pager(request, page, per, total, q=q)
    return _page(
        request,
        home,
        console,
        "images.html",
        rows=rows,
        usage=usage,
        q=q,
        p=p,
        live=f"/live/images?{p.query()}",
    )


@router.get("/layers", response_class=HTMLResponse)
def layers_page(
    request: Request,
    home: HomeDep,
    console: auth.ConsoleDep,
    page: PageNo = 1,
    per: Per = DEFAULT_PER,
    q: Text = "",
    kind: Kind = "",
) -> HTMLResponse:
    with home.session() as db:
        rows, total = fleet.list_layers(
            db, offset=(page - 1) * per, limit=per, q=q, kind=kind or None
        )
    p = _pager(request, page, per, total, q=q, kind=kind)
    return _page(request, home, console, "layers.html", rows=rows, q=q, kind=kind, p=p)


@router.get("/layers/{name}", response_class=HTMLResponse)
def layer_page(
    request: Request,
    home: HomeDep,
    console: auth.ConsoleDep,
    name: ObjName,
    page: PageNo = 1,
    per: Per = DEFAULT_PER,
) -> HTMLResponse:
    try:
        with home.session() as db:
            layer = layers.get_layer(db, name)
            versions = people.layer_versions(db, name=name)
            ents, total = access.list_entitlements(
                db, layer=name, offset=(page - 1) * per, limit=per
            )
    except NotFound as exc:
        return _missing(request, home, console, str(exc))
    p = _pager(request, page, per, total)
    return _page(
        request,
        home,
        console,
        "layer.html",
        layer=layer,
        versions=versions,
        entitlements=ents,
        p=p,
    )


def page_users(
    db: Session, *, page: int, per: int, q: str, group: str
) -> tuple[list[access.UserRow], int, dict[int, people.UserExtra], str | None]:
    """The users page's rows and their extras, or why there are none (an unknown group)."""
    try:
        rows, total = access.list_users(
            db, offset=(page - 1) * per, limit=per, q=q, group=group or None
        )
    except NotFound as exc:
        return [], 0, {}, str(exc)
    extras = people.user_extras(db, user_ids=[r.user.id for r in rows])
    return rows, total, extras, None


@router.get("/users", response_class=HTMLResponse)
def users_page(
    request: Request,
    home: HomeDep,
    console: auth.ConsoleDep,
    page: PageNo = 1,
    per: Per = DEFAULT_PER,
    q: Text = "",
    group: Annotated[str, Query(max_length=64)] = "",
) -> HTMLResponse:
    with home.session() as db:
        rows, total, extras, error = page_users(db, page=page, per=per, q=q, group=group)
        flashes = auth.take_flashes(db, console)
    if error:
        flashes.append(("error", error))
    p = _pager(request, page, per, total, q=q, group=group)
    return render(
        request,
        "users.html",
        csrf=console.csrf,
        flashes=flashes,
        rows=rows,
        extras=extras,
        q=q,
        group=group,
        p=p,
        live=f"/live/users?{p.query()}",
    )


@router.get("/groups", response_class=HTMLResponse)
def groups_page(
    request: Request,
    home: HomeDep,
    console: auth.ConsoleDep,
    page: PageNo = 1,
    per: Per = DEFAULT_PER,
    q: Text = "",
) -> HTMLResponse:
    with home.session() as db:
        rows, total = access.list_groups(db, offset=(page - 1) * per, limit=per, q=q)
        ids = [g.id for g, _n in rows]
        members = people.group_members(db, group_ids=ids)
        entitled = people.group_layers(db, group_ids=ids)
    p = _pager(request, page, per, total, q=q)
    return _page(
        request,
        home,
        console,
        "groups.html",
        rows=rows,
        members=members,
        layers=entitled,
        q=q,
        p=p,
        live=f"/live/groups?{p.query()}",
    )
