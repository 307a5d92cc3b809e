"""Console actions on users, groups, memberships and entitlements (POST, each behind the
sign-in's CSRF token), through ``HomeAdmin`` as the API and the CLI go."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Form
from fastapi.responses import Response

from lamina.errors import UsageError
from lamina.manager.admin import HomeAdmin
from lamina.manager.console.act import ActDep, Next
from lamina.manager.console.params import ObjName
from lamina.manager.schemas import (
    EntitlementCreate,
    GroupCreate,
    MemberCreate,
    UserCreate,
    UserUpdate,
    build,
)

router = APIRouter()

UserP = Annotated[str, Form(max_length=64)]
NameField = Annotated[str, Form(max_length=100)]
Groups = Annotated[str, Form(max_length=2000)]  # names separated by commas or spaces
Policy = Annotated[str, Form(max_length=10)]
TARGET_KINDS = ("user", "group", "machine")


def _groups(text: str) -> list[str]:
    return [g for g in re.split(r"[,\s]+", text.strip()) if g]


# -- users ------------------------------------------------------------------------------------


@router.post("/users/add", response_model=None)
def add_user(
    act: ActDep, name: UserP, groups: Groups = "", policy: Policy = "all", next_: Next = ""
) -> Response:
    def run(admin: HomeAdmin) -> str:
        body = build(UserCreate, name=name.strip(), groups=_groups(groups), policy=policy)
        return admin.add_user(body).summary()

    return act.run(f"Add user {name}", next_, "/users", run)


@router.post("/users/{name}/set", response_model=None)
def set_user(
    act: ActDep, name: str, groups: Groups = "", policy: Policy = "", next_: Next = ""
) -> Response:
    """The user's groups (all of them: an empty field leaves it in none) and policy."""

    def run(admin: HomeAdmin) -> str:
        body = build(UserUpdate, groups=_groups(groups), policy=policy or None)
        return admin.change_user(name, body).summary("changed")

    return act.run(f"Change user {name}", next_, "/users", run)


@router.post("/users/{name}/remove", response_model=None)
def remove_user(act: ActDep, name: str, next_: Next = "") -> Response:
    def run(admin: HomeAdmin) -> str:
        admin.remove_user(name)
        return f"removed user {name}"

    return act.run(f"Remove user {name}", next_, "/users", run)


# -- groups and members -----------------------------------------------------------------------


@router.post("/groups/add", response_model=None)
def add_group(act: ActDep, name: UserP, next_: Next = "") -> Response:
    def run(admin: HomeAdmin) -> str:
        admin.add_group(build(GroupCreate, name=name.strip()))
        return f"added group {name.strip()}"

    return act.run(f"Add group {name}", next_, "/groups", run)


@router.post("/groups/{name}/remove", response_model=None)
def remove_group(act: ActDep, name: str, next_: Next = "") -> Response:
    def run(admin: HomeAdmin) -> str:
        admin.remove_group(name)
        return f"removed group {name}"

    return act.run(f"Remove group {name}", next_, "/groups", run)


@router.post("/groups/{name}/members/add", response_model=None)
def add_member(act: ActDep, name: str, user: UserP, next_: Next = "") -> Response:
    def run(admin: HomeAdmin) -> str:
        admin.add_member(name, build(MemberCreate, user=user.strip()))
        return f"{user.strip()} is in group {name}"

    return act.run(f"Add {user} to {name}", next_, "/groups", run)


@router.post("/groups/{name}/members/remove", response_model=None)
def remove_member(act: ActDep, name: str, user: UserP, next_: Next = "") -> Response:
    def run(admin: HomeAdmin) -> str:
        admin.remove_member(name, user.strip())
        return f"{user.strip()} is no longer in group {name}"

    return act.run(f"Take {user} out of {name}", next_, "/groups", run)


# -- entitlements -----------------------------------------------------------------------------


@router.post("/layers/{name}/entitle", response_model=None)
def entitle(
    act: ActDep,
    name: ObjName,
    kind: Annotated[str, Form(max_length=10)],
    target: NameField,
    version: Annotated[str, Form(max_length=12)] = "",
    priority: Annotated[int, Form(ge=0, le=1_000_000)] = 100,
    next_: Next = "",
) -> Response:
    def run(admin: HomeAdmin) -> str:
        if kind not in TARGET_KINDS:
            raise UsageError(f"entitle to a user, a group or a machine, not {kind!r}")
        layer = f"{name}@{version.strip()}" if version.strip() else name
        body = build(EntitlementCreate, layer=layer, priority=priority, **{kind: target.strip()})
        return admin.entitle(body).summary()

    return act.run(f"Entitle {name}", next_, f"/layers/{name}", run)


@router.post("/layers/{name}/unentitle", response_model=None)
def unentitle(
    act: ActDep, name: ObjName, id: Annotated[int, Form(ge=1, le=2**31 - 1)], next_: Next = ""
) -> Response:
    return act.run(
        f"Unentitle {name}",
        next_,
        f"/layers/{name}",
        lambda admin: admin.remove_entitlement(id, layer=name).summary(),
    )
