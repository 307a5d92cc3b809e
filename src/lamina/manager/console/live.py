"""Live state for the console's pages: small JSON fragments the page script polls (every
2 s while the page is visible) and writes into the cells marked ``data-field``, inside the
rows marked ``data-key``. Values are plain text, set with ``textContent`` (never markup).

The fragments re-run the page's own query (same filters, same page), so their cost is that
of the page, and ``keys`` tells the page when its rows are no longer the current ones.

The console's static files (CSS, script, icon) are served from the package here too.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from lamina.errors import NotFound
from lamina.manager.console import auth
from lamina.manager.console.pages import page_machines, page_users
from lamina.manager.console.params import (
    GroupName,
    ImagePagingDep,
    Mode,
    Order,
    PagingDep,
    Sort,
    Text,
    View,
)
from lamina.manager.console.render import ago, human_bytes, number
from lamina.manager.deps import HomeDep
from lamina.manager.services import access, fleet, machines
from lamina.manager.services import console as svc

router = APIRouter()

_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _json(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse(data, headers=_HEADERS)


def _state(online: bool) -> str:
    return "online" if online else "offline"


@router.get("/live/dashboard")
def live_dashboard(home: HomeDep, _console: auth.ConsoleDep) -> JSONResponse:
    with home.session() as db:
        d = svc.dashboard(db, store=home.store, deltas=home.deltas_dir)
    fields = {
        "machines": number(d.machines),
        "online": number(d.online),
        "offline": number(d.offline),
        "stateless": number(d.stateless),
        "sessions": number(d.sessions),
        "users_logged_in": number(d.users_logged_in),
        "users": number(d.users),
        "groups": number(d.groups),
        "layers": number(d.layers),
        "entitlements": number(d.entitlements),
        "logins_per_minute": number(d.logins_per_minute),
        "image_versions": number(d.image_versions),
        "delta_bytes": human_bytes(d.delta_bytes),
        "store_bytes": human_bytes(d.store_bytes),
        "store_chunks": number(d.store_chunks),
        "logical_bytes": human_bytes(d.logical_bytes),
        "dedup_ratio": f"{d.dedup_ratio:.2f}×",
    }
    rows = {ref: {"pinned": number(n)} for ref, n in d.versions_in_use}
    return _json({"fields": fields, "rows": rows, "keys": [ref for ref, _n in d.versions_in_use]})


@router.get("/live/machines")
def live_machines(
    home: HomeDep,
    _console: auth.ConsoleDep,
    paging: PagingDep,
    request: Request,
    image: Text = "",
    mode: Mode = "",
    sort: Sort = "",
    order: Order = "",
    name: Annotated[str, Query(max_length=100)] = "",
) -> JSONResponse:
    clients = View(request, home, _console).clients()
    with home.session() as db:
        if name:
            try:
                found = [machines.get(db, name)]
            except NotFound:
                found = []
            rows, total = svc.machine_rows(db, deltas=home.deltas_dir, machines=found), len(found)
        else:
            rows, total = page_machines(
                db, home, paging, image=image, mode=mode, sort=sort, order=order
            )
    out: dict[str, Any] = {
        "rows": {
            r.name: {
                "image": r.image,
                "state": _state(r.online),
                "delta": human_bytes(r.delta_bytes),
                "delta_bytes": r.delta_bytes,
                "last_boot": ago(r.last_boot_at),
                "users": ", ".join(r.users) or "—",
                "client": clients.get(r.name, "—"),
            }
            for r in rows
        }
    }
    if not name:
        out["keys"] = [r.name for r in rows]
        out["fields"] = {"total": number(total)}
    return _json(out)


@router.get("/live/images")
def live_images(home: HomeDep, _console: auth.ConsoleDep, paging: ImagePagingDep) -> JSONResponse:
    with home.session() as db:
        images, total = fleet.list_images(db, offset=paging.offset, limit=paging.per, q=paging.q)
    rows = {
        f"{image.name}@{v.version.version}": {"machines": number(v.machines)}
        for image, versions in images
        for v in versions
    }
    keys = [
        f"{image.name}@{v.version.version}"
        for image, versions in images
        for v in reversed(versions)
    ]
    return _json({"rows": rows, "keys": keys, "fields": {"total": number(total)}})


@router.get("/live/users")
def live_users(
    home: HomeDep, _console: auth.ConsoleDep, paging: PagingDep, group: GroupName = ""
) -> JSONResponse:
    with home.session() as db:
        users, total, extras, _error = page_users(db, paging, group=group)
    rows = {
        u.user.name: {
            "sessions": ", ".join(extras[u.user.id].sessions) or "—",
            "writable_size": human_bytes(extras[u.user.id].writable_bytes),
            "in_use_on": u.in_use_on or "—",
            "pending_rebase": ", ".join(extras[u.user.id].pending_rebase) or "—",
        }
        for u in users
    }
    keys = [u.user.name for u in users]
    return _json({"rows": rows, "keys": keys, "fields": {"total": number(total)}})


@router.get("/live/groups")
def live_groups(home: HomeDep, _console: auth.ConsoleDep, paging: PagingDep) -> JSONResponse:
    with home.session() as db:
        groups, total = access.list_groups(db, offset=paging.offset, limit=paging.per, q=paging.q)
    rows = {g.name: {"members": number(n)} for g, n in groups}
    keys = [g.name for g, _n in groups]
    return _json({"rows": rows, "keys": keys, "fields": {"total": number(total)}})


# -- static files -----------------------------------------------------------------------------

STATIC = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


@cache
def _static(name: str) -> tuple[bytes, str]:
    data = resources.files("lamina.manager.console").joinpath("static", name).read_bytes()
    return data, f'"{hashlib.sha256(data).hexdigest()[:32]}"'


@router.get("/static/{name}")
def static(request: Request, name: str) -> Response:
    if name not in STATIC:
        raise HTTPException(404, "no such file")
    data, etag = _static(name)
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=STATIC[name], headers=headers)
