"""lamina machine add|list|show|set|reset|rm, and lamina delta commit.

Every command but ``list`` works on the --home's database or through --manager's API, by
the one code path of ``lamina.manager.admin``: the same rules, output and refusals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lamina.cli import credentials
from lamina.cli.common import (
    CaOpt,
    ForceOpt,
    HomeOpt,
    JsonOpt,
    ManagerOpt,
    TokenOpt,
    admin,
    emit_json,
    human,
    open_home,
    out,
    say,
    table,
)

app = typer.Typer(help="Machines: identity, pinned image version, delta.", no_args_is_help=True)
delta_app = typer.Typer(help="Machine deltas.", no_args_is_help=True)
app.command("credentials")(credentials.machine_credentials)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Machine name.")],
    image: Annotated[str, typer.Option("--image", help="IMAGE (latest version) or IMAGE@VERSION.")],
    mode: Annotated[
        str, typer.Option("--mode", help="stateless (clean at each boot) or stateful.")
    ] = "stateless",
    hostname: Annotated[str | None, typer.Option("--hostname", help="Defaults to NAME.")] = None,
    mac: Annotated[str | None, typer.Option("--mac", help="Generated when omitted.")] = None,
    domain: Annotated[
        str | None, typer.Option("--domain", help="DNS domain (FQDN = host.domain).")
    ] = None,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a machine pinned to an image version; --json shows its agent token."""
    from lamina.manager.schemas import MachineCreate, build

    body = build(
        MachineCreate, name=name, image=image, mode=mode, hostname=hostname, mac=mac, domain=domain
    )
    added = admin(home, manager, token, ca).add_machine(body)
    emit_json(added) if as_json else say(added.summary())


@app.command("list")
def list_(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Machines with their image version, mode and delta size."""
    from lamina.delta.file import BLOCK, delta_usage
    from lamina.manager.services import machines

    h = open_home(home)
    rows: list[dict[str, Any]] = []
    with h.session(read_only=True) as session:
        for m in machines.list_all(session):
            blocks, stored = delta_usage(h.deltas_dir / m.name)
            rows.append(
                {
                    "name": m.name,
                    "image": m.image_version.ref,
                    "mode": m.mode,
                    "hostname": m.hostname,
                    "fqdn": m.fqdn,
                    "mac": m.mac,
                    "delta_bytes": blocks * BLOCK,
                    "delta_stored_bytes": stored,
                }
            )
    if as_json:
        emit_json(rows)
        return
    table(
        ["NAME", "IMAGE", "MODE", "HOSTNAME", "MAC", "DELTA"],
        [
            [r["name"], r["image"], r["mode"], r["fqdn"], r["mac"], human(r["delta_bytes"])]
            for r in rows
        ],
    )


@app.command("show")
def show(
    name: Annotated[str, typer.Argument()],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Everything about one machine, identity included."""
    detail = admin(home, manager, token, ca).show_machine(name)
    if as_json:
        emit_json(detail)
        return
    from rich.markup import escape

    for key, value in detail.model_dump(mode="json").items():
        out.print(f"[bold]{key}[/bold]: {escape(str(value))}")


@app.command("set")
def set_(
    name: Annotated[str, typer.Argument()],
    hostname: Annotated[str | None, typer.Option("--hostname")] = None,
    domain: Annotated[str | None, typer.Option("--domain", help="'' clears it.")] = None,
    mac: Annotated[str | None, typer.Option("--mac")] = None,
    mode: Annotated[str | None, typer.Option("--mode")] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="Re-pin to IMAGE[@V]; discards the delta.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Extra #cloud-config YAML file.")
    ] = None,
    new_machine_id: Annotated[bool, typer.Option("--new-machine-id")] = False,
    new_host_keys: Annotated[bool, typer.Option("--new-host-keys")] = False,
    force: ForceOpt = False,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a machine's identity, mode or pinned image version (a stateful machine's
    delta is kept unless --force: re-pinning discards it)."""
    from lamina.identity import parse_extra_config
    from lamina.manager.schemas import MachineUpdate, build

    body = build(
        MachineUpdate,
        image=image,
        mode=mode,
        hostname=hostname,
        domain=domain,
        mac=mac,
        extra_config=parse_extra_config(config.read_text()) if config is not None else None,
        new_machine_id=new_machine_id,
        new_host_keys=new_host_keys,
    )
    changed = admin(home, manager, token, ca).change_machine(name, body, force=force)
    emit_json(changed) if as_json else say(changed.summary())


@app.command("reset")
def reset(
    name: Annotated[str, typer.Argument()],
    force: ForceOpt = False,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Discard a machine's delta: it boots the pristine image version again (a stateful
    machine's data needs --force)."""
    done = admin(home, manager, token, ca).reset_machine(name, force=force)
    emit_json(done) if as_json else say(done.summary())


@app.command("rm")
def rm(
    name: Annotated[str, typer.Argument()],
    force: ForceOpt = False,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a machine and its delta (a stateful machine's data needs --force)."""
    done = admin(home, manager, token, ca).remove_machine(name, force=force)
    emit_json(done) if as_json else say(done.summary())


@delta_app.command("commit")
def commit(
    machine: Annotated[str, typer.Argument(metavar="MACHINE")],
    as_image: Annotated[
        str | None,
        typer.Option("--as", help="Image to add the version to (default: the machine's)."),
    ] = None,
    repin: Annotated[
        bool,
        typer.Option("--repin", help="Pin the machine to the new version and clear its delta."),
    ] = False,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn a machine's delta into a new image version (an empty delta, or one that gives
    an existing version's content, answers "unchanged, NAME@N")."""
    from lamina.manager.schemas import DeltaCommit, build

    body = build(DeltaCommit, image=as_image, repin=repin)
    done = admin(home, manager, token, ca).commit_delta(machine, body)
    emit_json(done) if as_json else say(done.summary())
