"""Console sign-in and the actions on machines, images and layers (POST, each behind the
sign-in's CSRF token).

Actions answer with a redirect back to the page they came from (``next``, a local path)
and leave a message for it, so a reload never repeats one; refusals (a machine that is
connected while its delta is reset) come back as messages, and a change that would lose
data as a confirmation page (see ``act.py``). Each runs the one service of its operation,
through ``HomeAdmin``, as the API and the CLI do.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from lamina.errors import LaminaError
from lamina.manager.admin import HomeAdmin
from lamina.manager.console import auth
from lamina.manager.console.act import ActDep, Confirm, Next, local
from lamina.manager.console.params import ObjName
from lamina.manager.console.render import SECURITY_HEADERS, render
from lamina.manager.deps import HomeDep
from lamina.manager.schemas import DeltaCommit, MachineCreate, MachineMove, MachineUpdate, build
from lamina.names import NAME_PATTERN

router = APIRouter()

Field = Annotated[str, Form(max_length=253)]
Version = Annotated[str, Form(max_length=12)]
NAME = re.compile(NAME_PATTERN)


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


@router.post("/machines/add", response_model=None)
def add_machine(
    act: ActDep,
    name: Field,
    image: Field,
    mode: Field = "stateless",
    hostname: Field = "",
    mac: Field = "",
    domain: Field = "",
    next_: Next = "",
) -> Response:
    def run(admin: HomeAdmin) -> str:
        fields = {"hostname": hostname, "mac": mac, "domain": domain}
        given = {k: v.strip() for k, v in fields.items() if v.strip()}
        body = build(MachineCreate, name=name.strip(), image=image.strip(), mode=mode, **given)
        added = admin.add_machine(body)
        return f"{added.summary()}; its agent token (shown once): {added.token}"

    return act.run(f"Add {name}", next_, "/machines", run)


@router.post("/machines/{name}/set", response_model=None)
def set_machine(
    act: ActDep,
    name: ObjName,
    hostname: Field = "",
    domain: Field = "",
    mac: Field = "",
    mode: Field = "",
    clear_domain: Annotated[bool, Form()] = False,
    next_: Next = "",
    confirm: Confirm = False,
) -> Response:
    """Identity and mode; empty fields stay as they are."""
    form = {"hostname": hostname, "domain": domain, "mac": mac, "mode": mode}

    def run(admin: HomeAdmin) -> str:
        given = {k: v.strip() for k, v in form.items() if v.strip()}
        if clear_domain:
            given["domain"] = ""
        body = build(MachineUpdate, **given)
        return admin.change_machine(name, body, force=confirm).summary()

    form_sent = form | ({"clear_domain": "1"} if clear_domain else {})
    return act.run(f"Change {name}", next_, f"/machines/{name}", run, form=form_sent)


@router.post("/machines/{name}/repin", response_model=None)
def repin(
    act: ActDep,
    name: ObjName,
    image: Annotated[str, Form(max_length=120)],
    next_: Next = "",
    confirm: Confirm = False,
) -> Response:
    def run(admin: HomeAdmin) -> str:
        body = build(MachineUpdate, image=image.strip())
        return f"{admin.change_machine(name, body, force=confirm).summary()}; delta discarded"

    return act.run(f"Re-pin {name}", next_, "/machines", run, form={"image": image})


@router.post("/machines/{name}/reset", response_model=None)
def reset(act: ActDep, name: ObjName, next_: Next = "", confirm: Confirm = False) -> Response:
    return act.run(
        f"Reset {name}",
        next_,
        "/machines",
        lambda admin: admin.reset_machine(name, force=confirm).summary(),
        form={},
    )


@router.post("/machines/{name}/commit", response_model=None)
def commit(
    act: ActDep,
    name: ObjName,
    next_: Next = "",
    as_image: Annotated[str, Form(max_length=100)] = "",
    repin: Annotated[bool, Form()] = False,
) -> Response:
    def run(admin: HomeAdmin) -> str:
        body = build(DeltaCommit, image=as_image.strip() or None, repin=repin)
        done = admin.commit_delta(name, body)
        if done.unchanged:
            return f"{name}: {done.summary()}"
        text = f"{name}: delta committed as {done.ref} ({done.changed_chunks} chunks changed)"
        if repin:
            text += f"; {name} now runs {done.ref} with an empty delta"
        return text

    return act.run(f"Commit {name}", next_, "/machines", run)


@router.post("/machines/{name}/move", response_model=None)
def move(
    act: ActDep,
    name: ObjName,
    to: Annotated[str, Form(max_length=100)],
    next_: Next = "",
    confirm: Confirm = False,
) -> Response:
    def run(admin: HomeAdmin) -> str:
        return admin.move_machine(name, build(MachineMove, to=to), force=confirm).summary()

    return act.run(f"Move {name}", next_, "/machines", run, form={"to": to})


@router.post("/machines/{name}/remove", response_model=None)
def remove_machine(
    act: ActDep, name: ObjName, next_: Next = "", confirm: Confirm = False
) -> Response:
    return act.run(
        f"Remove {name}",
        next_,
        "/machines",
        lambda admin: admin.remove_machine(name, force=confirm).summary(),
        form={},
    )


# -- images and layers ------------------------------------------------------------------------


def _ref(name: str, version: str) -> str:
    return f"{name}@{version.strip()}" if version.strip() else name


@router.post("/images/{name}/remove", response_model=None)
def remove_image(act: ActDep, name: ObjName, version: Version = "", next_: Next = "") -> Response:
    ref = _ref(name, version)
    return act.run(
        f"Remove {ref}", next_, "/images", lambda admin: admin.remove_image(ref).summary()
    )


@router.post("/layers/{name}/remove", response_model=None)
def remove_layer(
    act: ActDep, name: ObjName, version: Version = "", next_: Next = "", confirm: Confirm = False
) -> Response:
    ref = _ref(name, version)
    return act.run(
        f"Remove {ref}",
        next_,
        "/layers",
        lambda admin: admin.remove_layer(ref, force=confirm).summary(),
        form={"version": version},
    )


# -- several machines at once -----------------------------------------------------------------


@router.post("/machines/bulk", response_model=None)
def bulk(
    act: ActDep,
    names: Annotated[list[str], Form(max_length=500)],
    action: Annotated[str, Form(pattern="^(reset|repin)$")],
    image: Annotated[str, Form(max_length=120)] = "",
    next_: Next = "",
    confirm: Confirm = False,
) -> Response:
    """Reset or re-pin the selected machines: a page first lists them and what is lost
    (their deltas, stateful ones' data included); once confirmed each runs as on its own,
    and the message says which were done and which refused, with why."""
    names = list(dict.fromkeys(n for n in names if NAME.fullmatch(n)))
    label = f"Re-pin to {image}" if action == "repin" else "Reset"
    if not names:
        return act.back(next_, "/machines", "error", f"{label}: no machine selected")
    if not confirm:
        return render(
            act.request,
            "bulk_confirm.html",
            csrf=act.console.csrf,
            label=label,
            action=action,
            image=image,
            names=names,
            back=local(next_, "/machines"),
        )
    done: list[str] = []
    refused: list[str] = []
    admin = act.admin
    for name in names:
        try:
            if action == "reset":
                admin.reset_machine(name, force=True)
            else:
                admin.change_machine(name, build(MachineUpdate, image=image.strip()), force=True)
            done.append(name)
        except LaminaError as exc:
            refused.append(f"{name} ({exc})")
    text = f"{label}: {', '.join(done) or 'none'} done"
    if refused:
        text += f"; refused: {'; '.join(refused)}"
    return act.back(next_, "/machines", "error" if refused else "ok", text)
