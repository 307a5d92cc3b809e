"""lamina user add|set|list|rm, lamina group add|list|rm|add-member|rm-member,
lamina entitle|unentitle: who gets which layers.

Each command works on the embedded database under --home, or through a manager's API with
--manager URL --token T (LAMINA_MANAGER, LAMINA_TOKEN): one code path (``lamina.manager
.admin``), the same output and the same refusals.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from lamina.cli.common import (
    CaOpt,
    HomeOpt,
    JsonOpt,
    ManagerOpt,
    Said,
    TokenOpt,
    admin,
    each,
    emit_json,
    fields,
    say,
    table,
)
from lamina.units import timestamp

user_app = typer.Typer(help="Users and their writable layers.", no_args_is_help=True)
group_app = typer.Typer(help="Groups of users.", no_args_is_help=True)

UserOpt = Annotated[str | None, typer.Option("--user", help="Entitle a user.")]
GroupOpt = Annotated[str | None, typer.Option("--group", help="Entitle a group.")]
MachineOpt = Annotated[str | None, typer.Option("--machine", help="Entitle a machine.")]
FromUserOpt = Annotated[str | None, typer.Option("--user", help="Take it back from a user.")]
FromGroupOpt = Annotated[str | None, typer.Option("--group", help="Take it back from a group.")]
FromMachineOpt = Annotated[
    str | None, typer.Option("--machine", help="Take it back from a machine.")
]
PolicyOpt = Annotated[
    str, typer.Option("--policy", help="What the writable layer keeps: all, profile, apps.")
]


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="Login name.")],
    group: Annotated[list[str] | None, typer.Option("--group", help="Group, repeat.")] = None,
    policy: PolicyOpt = "all",
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a user (with an empty writable layer) to groups.

    Example: lamina user add alice --group finance
    """
    from lamina.manager.schemas import UserCreate, build

    body = build(UserCreate, name=name, groups=group or [], policy=policy)
    user = admin(home, manager, token, ca).add_user(body)
    emit_json(user.model_dump(exclude={"created_at"})) if as_json else say(user.summary())


@user_app.command("set")
def user_set(
    name: Annotated[str, typer.Argument(help="Login name.")],
    group: Annotated[
        list[str] | None, typer.Option("--group", help="Its groups, all of them (repeat).")
    ] = None,
    no_groups: Annotated[bool, typer.Option("--no-groups", help="In no group.")] = False,
    policy: Annotated[
        str | None, typer.Option("--policy", help="What the writable layer keeps.")
    ] = None,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a user's groups or writable-layer policy (its sessions follow live).

    Example: lamina user set alice --group finance --group eng --policy profile
    """
    from lamina.manager.schemas import UserUpdate, build

    groups = [] if no_groups else group
    body = build(UserUpdate, groups=groups, policy=policy)
    user = admin(home, manager, token, ca).change_user(name, body)
    if as_json:
        emit_json(user.model_dump(exclude={"created_at"}))
    else:
        say(user.summary("changed"))


@user_app.command("list")
def user_list(
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Users, their groups and where their writable layer is in use.

    Example: lamina user list
    """
    users = admin(home, manager, token, ca).list_users()
    if as_json:
        emit_json([u.model_dump(exclude={"created_at"}) for u in users])
        return
    table(
        ["NAME", "GROUPS", "WRITABLE", "POLICY", "VERSION", "IN USE ON"],
        [
            [
                u.name,
                ",".join(u.groups),
                u.writable or "-",
                u.policy or "-",
                u.writable_version or "-",
                u.in_use_on or "-",
            ]
            for u in users
        ],
    )


@user_app.command("show")
def user_show(
    name: Annotated[str, typer.Argument(help="Login name.")],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A user's groups, writable layer and entitlements (its own and its groups').

    Example: lamina user show alice
    """
    ops = admin(home, manager, token, ca)
    user = ops.show_user(name)
    mine = ops.list_entitlements(user=name)
    for group in user.groups:
        mine += ops.list_entitlements(group=group)
    data = user.model_dump(mode="json") | {
        "entitlements": [_entitled(e) for e in sorted(mine, key=lambda e: e.priority)]
    }
    emit_json(data) if as_json else fields(data)


def _entitled(e: Any) -> str:
    ref = e.layer if e.version is None else f"{e.layer}@{e.version}"
    return f"{ref} ({e.kind} {e.target}, priority {e.priority})"


@user_app.command("rm")
def user_rm(
    names: Annotated[list[str], typer.Argument(metavar="NAME...")],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove users (refused while logged in; the writable layer's data stays).

    Example: lamina user rm alice bob
    """
    ops = admin(home, manager, token, ca)

    def one(name: str) -> Said:
        ops.remove_user(name)
        return Said(f"removed user {name}", {"removed": name})

    each(names, one, as_json)


@group_app.command("add")
def group_add(
    name: Annotated[str, typer.Argument()],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a group.

    Example: lamina group add finance
    """
    from lamina.manager.schemas import GroupCreate, build

    admin(home, manager, token, ca).add_group(build(GroupCreate, name=name))
    emit_json({"name": name}) if as_json else say(f"added group {name}")


@group_app.command("list")
def group_list(
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Groups and how many members each has.

    Example: lamina group list
    """
    rows = [
        {"name": g.name, "members": g.members}
        for g in admin(home, manager, token, ca).list_groups()
    ]
    if as_json:
        emit_json(rows)
    else:
        table(["NAME", "MEMBERS"], [[r["name"], r["members"]] for r in rows])


@group_app.command("rm")
def group_rm(
    names: Annotated[list[str], typer.Argument(metavar="NAME...")],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove groups (their members stay; their entitlements go).

    Example: lamina group rm contractors interns
    """
    ops = admin(home, manager, token, ca)

    def one(name: str) -> Said:
        ops.remove_group(name)
        return Said(f"removed group {name}", {"removed": name})

    each(names, one, as_json)


@group_app.command("add-member")
def group_add_member(
    group: Annotated[str, typer.Argument(metavar="GROUP")],
    users: Annotated[list[str], typer.Argument(metavar="USER...")],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put users in a group (its layers attach live where they are logged in).

    Example: lamina group add-member finance alice bob
    """
    from lamina.manager.schemas import MemberCreate, build

    ops = admin(home, manager, token, ca)

    def one(user: str) -> Said:
        ops.add_member(group, build(MemberCreate, user=user))
        data = {"group": group, "user": user, "member": True}
        return Said(f"{user} is in group {group}", data)

    each(users, one, as_json)


@group_app.command("rm-member")
def group_rm_member(
    group: Annotated[str, typer.Argument(metavar="GROUP")],
    users: Annotated[list[str], typer.Argument(metavar="USER...")],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take users out of a group (its layers detach live).

    Example: lamina group rm-member finance bob
    """
    ops = admin(home, manager, token, ca)

    def one(user: str) -> Said:
        ops.remove_member(group, user)
        data = {"group": group, "user": user, "member": False}
        return Said(f"{user} is no longer in group {group}", data)

    each(users, one, as_json)


class _DefaultTo(TyperGroup):
    """``lamina entitle LAYER ...`` means ``lamina entitle to LAYER ...``; ``lamina
    entitle list`` lists (a layer named list is entitled by ``entitle to list``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["to", *args]
        return super().parse_args(ctx, args)


entitle_app = typer.Typer(
    cls=_DefaultTo,
    help="Entitle an app layer to a user, a group or a machine: lamina entitle LAYER"
    " --user U; lamina entitle list.",
    no_args_is_help=True,
)


@entitle_app.command("list")
def entitle_list(
    layer: Annotated[str | None, typer.Option("--layer", help="Only this layer's.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's own.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Only this group's.")] = None,
    machine: Annotated[str | None, typer.Option("--machine", help="Only this machine's.")] = None,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Entitlements: which layer goes to whom, in attach order.

    Example: lamina entitle list --group finance
    """
    found = admin(home, manager, token, ca).list_entitlements(
        layer=layer, user=user, group=group, machine=machine
    )
    if as_json:
        emit_json([e.model_dump(mode="json") for e in found])
        return
    table(
        ["ID", "LAYER", "VERSION", "KIND", "TARGET", "PRIORITY", "CREATED"],
        [
            [
                e.id,
                e.layer,
                "latest" if e.version is None else e.version,
                e.kind,
                e.target,
                e.priority,
                timestamp(e.created_at),
            ]
            for e in found
        ],
    )


@entitle_app.command("to")
def entitle(
    layer: Annotated[str, typer.Argument(help="NAME (follows its latest version) or NAME@V.")],
    user: UserOpt = None,
    group: GroupOpt = None,
    machine: MachineOpt = None,
    priority: Annotated[
        int, typer.Option("--priority", help="Attach order, lower first (first wins).")
    ] = 100,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Entitle an app layer to a user, a group or a machine (attached live at login).

    Example: lamina entitle office --group finance --priority 50
    """
    from lamina.errors import UsageError
    from lamina.manager.schemas import EntitlementCreate, build

    if sum(x is not None for x in (user, group, machine)) != 1:
        raise UsageError("give exactly one of --user, --group, --machine")
    body = build(
        EntitlementCreate, layer=layer, user=user, group=group, machine=machine, priority=priority
    )
    ent = admin(home, manager, token, ca).entitle(body)
    if as_json:
        emit_json(ent.model_dump(exclude={"created_at"}))
    else:
        say(ent.summary())


def unentitle(
    layer: Annotated[str, typer.Argument(help="Layer NAME.")],
    user: FromUserOpt = None,
    group: FromGroupOpt = None,
    machine: FromMachineOpt = None,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take an entitlement back (the layer detaches live from sessions it was on).

    Example: lamina unentitle office --group finance
    """
    from lamina.errors import UsageError

    if sum(x is not None for x in (user, group, machine)) != 1:
        raise UsageError("give exactly one of --user, --group, --machine")
    gone = admin(home, manager, token, ca).unentitle(layer, user=user, group=group, machine=machine)
    emit_json(gone) if as_json else say(gone.summary())


def register(root: typer.Typer) -> None:
    root.add_typer(user_app, name="user")
    root.add_typer(group_app, name="group")
    root.add_typer(entitle_app, name="entitle")
    root.command("unentitle")(unentitle)
