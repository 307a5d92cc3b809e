"""Console sign-in and actions (POST, each behind the session's CSRF token).

Actions answer with a redirect back to the page they came from (``next``, a local path)
and leave a message for it, so a reload never repeats one; failures such as a machine that
is connected while its delta is reset come back as messages, not error pages.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from lamina.delta import uploads
from lamina.delta.file import delta_usage
from lamina.errors import LaminaError, UsageError
from lamina.home import Home
from lamina.manager.console import auth
from lamina.manager.console.params import ObjName
from lamina.manager.console.render import SECURITY_HEADERS, human_bytes, render
from lamina.manager.deps import HomeDep
from lamina.manager.services import access, machines
from lamina.manager.services import console as svc
from lamina.manager.services import console_access as people
from lamina.manager.services.commit import commit_delta
from lamina.names import parse_ref

router = APIRouter()

Next = Annotated[str, Form(alias="next", max_length=2000)]
TARGET_KINDS = ("user", "group", "machine")


def _local(path: str, default: str) -> str:
    """``path`` if it stays on this site (no scheme, no host, no header tricks)."""
    if (
        path.startswith("/")
        and not path.startswith("//")
        and "\\" not in path
        and not any(c in path for c in "\r\n\t")
    ):
        return path
    return default


def _back(
    home: Home, console: auth.ConsoleSignIn, next_: str, default: str, kind: str, text: str
) -> RedirectResponse:
    with home.session() as db:
        auth.flash(db, console, kind, text)
    return RedirectResponse(_local(next_, default), status_code=303)


# -- sign in and out --------------------------------------------------------------------------


def _signed_in(request: Request, sid: str) -> RedirectResponse:
    response = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
    auth.set_cookie(request, response, sid)
    return response


def _refused(request: Request) -> HTMLResponse:
    return render(
        request,
        "login.html",
        status_code=401,
        error="That token is not valid: it was used already, has expired, or was mistyped.",
    )


@router.get("/login", response_model=None)
def login_page(
    request: Request, home: HomeDep, token: Annotated[str, Query(max_length=200)] = ""
) -> Response:
    if not token:
        return render(request, "login.html", error=None)
    with home.session() as db:
        sid = auth.redeem(db, token)
    return _signed_in(request, sid) if sid else _refused(request)


@router.post("/login", response_model=None)
def login_form(
    request: Request, home: HomeDep, token: Annotated[str, Form(max_length=200)] = ""
) -> Response:
    with home.session() as db:
        sid = auth.redeem(db, token.strip())
    return _signed_in(request, sid) if sid else _refused(request)


@router.post("/logout")
def logout(home: HomeDep, console: auth.CsrfDep) -> RedirectResponse:
    with home.session() as db:
        auth.end(db, console)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(auth.COOKIE, path="/", httponly=True, samesite="strict")
    return response


# -- machines ---------------------------------------------------------------------------------


@router.post("/machines/{name}/reset")
def reset(
    home: HomeDep, console: auth.CsrfDep, name: ObjName, next_: Next = ""
) -> RedirectResponse:
    try:
        with home.session() as db:
            machines.get(db, name)
        before = svc.delta_state(home.deltas_dir, name, set()).delta_bytes
        uploads.discard_delta(home, name)  # refuses while the machine is connected
    except LaminaError as exc:
        return _back(home, console, next_, "/machines", "error", f"Reset {name}: {exc}")
    return _back(
        home, console, next_, "/machines", "ok", f"{name}: delta discarded ({human_bytes(before)})"
    )


@router.post("/machines/{name}/commit")
def commit(
    home: HomeDep,
    console: auth.CsrfDep,
    name: ObjName,
    next_: Next = "",
    as_image: Annotated[str, Form(max_length=100)] = "",
    repin: Annotated[bool, Form()] = False,
) -> RedirectResponse:
    try:
        with home.session() as db:
            machines.get(db, name)
        if delta_usage(home.deltas_dir / name)[0] == 0:
            raise UsageError("the delta is empty: nothing to commit")
        result = commit_delta(home, machine=name, image=as_image.strip() or None, repin=repin)
    except LaminaError as exc:
        return _back(home, console, next_, "/machines", "error", f"Commit {name}: {exc}")
    text = f"{name}: delta committed as {result['ref']} ({result['changed_chunks']} chunks changed)"
    if repin:
        text += f"; {name} now runs {result['ref']} with an empty delta"
    return _back(home, console, next_, "/machines", "ok", text)


@router.post("/machines/{name}/repin")
def repin(
    home: HomeDep,
    console: auth.CsrfDep,
    name: ObjName,
    image: Annotated[str, Form(max_length=120)],
    next_: Next = "",
) -> RedirectResponse:
    try:
        ref = parse_ref(image.strip(), "image name")
        with home.session() as db:
            _, target = machines.repin(db, name=name, image=ref, home=home)
            done = target.ref
    except LaminaError as exc:
        return _back(home, console, next_, "/machines", "error", f"Re-pin {name}: {exc}")
    return _back(
        home, console, next_, "/machines", "ok", f"{name}: re-pinned to {done}, delta discarded"
    )


# -- entitlements -----------------------------------------------------------------------------


@router.post("/layers/{name}/entitle")
def entitle(
    home: HomeDep,
    console: auth.CsrfDep,
    name: ObjName,
    kind: Annotated[str, Form(max_length=10)],
    target: Annotated[str, Form(max_length=100)],
    version: Annotated[str, Form(max_length=12)] = "",
    priority: Annotated[int, Form(ge=0, le=1_000_000)] = 100,
    next_: Next = "",
) -> RedirectResponse:
    page = f"/layers/{name}"
    try:
        if kind not in TARGET_KINDS:
            raise UsageError(f"entitle to a user, a group or a machine, not {kind!r}")
        if version and not version.isdigit():
            raise UsageError(f"bad version {version!r}")
        layer = f"{name}@{version}" if version else name
        with home.session() as db:
            to = access.target(db, **{kind: target.strip()})
            access.entitle(db, layer=layer, to=to, priority=priority)
    except LaminaError as exc:
        return _back(home, console, next_, page, "error", f"Entitle {name}: {exc}")
    return _back(home, console, next_, page, "ok", f"{layer} entitled to {kind} {target.strip()}")


@router.post("/layers/{name}/unentitle")
def unentitle(
    home: HomeDep,
    console: auth.CsrfDep,
    name: ObjName,
    id: Annotated[int, Form(ge=1, le=2**31 - 1)],
    next_: Next = "",
) -> RedirectResponse:
    page = f"/layers/{name}"
    try:
        with home.session() as db:
            kind, target = people.remove_layer_entitlement(db, layer=name, id=id)
    except LaminaError as exc:
        return _back(home, console, next_, page, "error", f"Unentitle {name}: {exc}")
    return _back(home, console, next_, page, "ok", f"{name} no longer entitled to {kind} {target}")
