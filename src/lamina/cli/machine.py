"""lamina machine add|list|show|set|reset|rm, and lamina delta commit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lamina.cli import credentials
from lamina.cli.common import HomeOpt, JsonOpt, emit_json, human, open_home, out, table
from lamina.home import Home

app = typer.Typer(help="Machines: identity, pinned image version, delta.", no_args_is_help=True)
delta_app = typer.Typer(help="Machine deltas.", no_args_is_help=True)
app.command("credentials")(credentials.machine_credentials)


def _describe(h: Home, m: Any, *, full: bool = False) -> dict[str, Any]:
    from lamina.delta.file import delta_usage

    blocks, stored = delta_usage(h.deltas_dir / m.name)
    data: dict[str, Any] = {
        "name": m.name,
        "image": m.image_version.ref,
        "mode": m.mode,
        "hostname": m.hostname,
        "fqdn": m.fqdn,
        "mac": m.mac,
        "delta_bytes": blocks * 4096,
        "delta_stored_bytes": stored,
    }
    if full:
        from lamina.identity import identity_from_machine, instance_id

        identity = identity_from_machine(m)
        data |= {
            "machine_id": m.machine_id,
            "domain": m.domain,
            "identity_rev": m.identity_rev,
            "instance_id": instance_id(identity),
            "ssh_host_keys": {k: v["public"] for k, v in identity.ssh_host_keys.items()},
            "network": identity.network,
            "extra_config": identity.extra_config,
            "created": m.created_at.isoformat(timespec="seconds"),
            "last_boot": m.last_boot_at.isoformat(timespec="seconds") if m.last_boot_at else None,
            "exports": [f"machine/{m.name}", f"machine/{m.name}/seed"],
        }
    return data


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Machine name.")],
    image: Annotated[str, typer.Option("--image", help="IMAGE (latest version) or IMAGE@VERSION.")],
    mode: Annotated[
        str, typer.Option("--mode", help="stateless (delta dropped at reset) or stateful.")
    ] = "stateless",
    hostname: Annotated[str | None, typer.Option("--hostname", help="Defaults to NAME.")] = None,
    mac: Annotated[str | None, typer.Option("--mac", help="Generated when omitted.")] = None,
    domain: Annotated[
        str | None, typer.Option("--domain", help="DNS domain (FQDN = host.domain).")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a machine pinned to an image version; --json shows its agent token."""
    from lamina.manager.services import machines

    h = open_home(home)
    with h.session() as session:
        added = machines.add(
            session, name=name, image=image, mode=mode, hostname=hostname, mac=mac, domain=domain
        )
        data = _describe(h, added.machine, full=True)
    if as_json:
        emit_json(data | {"token": added.token})
    else:
        out.print(f"{name}: {data['image']}, {mode}, hostname {data['fqdn']}, mac {data['mac']}")


@app.command("list")
def list_(
    new: Annotated[
        bool, typer.Option("--new", help="Devices that asked to boot and are no machine yet.")
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Machines with their image version, mode and delta size."""
    from lamina.manager.services import machines

    h = open_home(home)
    if new:
        _list_new(h, as_json)
        return
    with h.session(read_only=True) as session:
        rows = [_describe(h, m) for m in machines.list_all(session)]
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


def _list_new(h: Home, as_json: bool) -> None:
    from lamina.manager.services import netboot

    with h.session(read_only=True) as session:
        rows: list[dict[str, Any]] = [
            {
                "mac": d.mac,
                "first_seen": d.first_seen.isoformat(timespec="seconds"),
                "last_seen": d.last_seen.isoformat(timespec="seconds"),
                "requests": d.requests,
                "address": d.address,
                "platform": d.platform,
                "arch": d.arch,
                "manufacturer": d.manufacturer,
                "product": d.product,
                "serial": d.serial,
                "uuid": d.uuid,
            }
            for d in netboot.new_devices(session)
        ]
    if as_json:
        emit_json(rows)
        return
    table(
        ["MAC", "LAST SEEN", "TRIES", "FIRMWARE", "DEVICE"],
        [
            [
                r["mac"],
                r["last_seen"][:16].replace("T", " "),
                r["requests"],
                "/".join(filter(None, (r["platform"], r["arch"]))) or "-",
                " ".join(filter(None, (r["manufacturer"], r["product"], r["serial"]))) or "-",
            ]
            for r in rows
        ],
    )


@app.command("show")
def show(
    name: Annotated[str, typer.Argument()], home: HomeOpt = None, as_json: JsonOpt = False
) -> None:
    """Everything about one machine, identity included."""
    from lamina.manager.services import machines

    h = open_home(home)
    with h.session(read_only=True) as session:
        data = _describe(h, machines.get(session, name), full=True)
    if as_json:
        emit_json(data)
        return
    for key, value in data.items():
        out.print(f"[bold]{key}[/bold]: {value}")


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
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a machine's identity, mode or pinned image version."""
    from lamina.identity import parse_extra_config
    from lamina.manager.services import machines
    from lamina.names import parse_ref

    h = open_home(home)
    changes: dict[str, Any] = {}
    if hostname is not None:
        changes["hostname"] = hostname
    if domain is not None:
        changes["domain"] = domain or None
    if mac is not None:
        changes["mac"] = mac
    if config is not None:
        changes["extra_config"] = parse_extra_config(config.read_text())
    with h.session() as session:
        if image is not None:
            machines.repin(session, name=name, image=parse_ref(image, "image name"), home=h)
        if mode is not None:
            machines.set_mode(session, name=name, mode=mode, home=h)
        m = machines.set_identity(
            session,
            name=name,
            changes=changes,
            new_machine_id=new_machine_id,
            new_host_keys=new_host_keys,
        )
        session.flush()
        data = _describe(h, m, full=True)
    if as_json:
        emit_json(data)
    else:
        out.print(
            f"{name}: {data['image']}, {data['mode']}, hostname {data['fqdn']}, identity rev {data['identity_rev']}"
        )


@app.command("reset")
def reset(
    name: Annotated[str, typer.Argument()], home: HomeOpt = None, as_json: JsonOpt = False
) -> None:
    """Discard a machine's delta (it boots the pristine image version again)."""
    from lamina.delta import uploads
    from lamina.delta.file import delta_usage
    from lamina.manager.services import machines

    h = open_home(home)
    with h.session() as session:
        machines.get(session, name)
    before = delta_usage(h.deltas_dir / name)[1]
    uploads.discard_delta(h, name)
    if as_json:
        emit_json({"name": name, "freed_bytes": before})
    else:
        out.print(f"{name}: delta discarded ({human(before)})")


@app.command("rm")
def rm(
    name: Annotated[str, typer.Argument()], home: HomeOpt = None, as_json: JsonOpt = False
) -> None:
    """Remove a machine and its delta."""
    import shutil

    from lamina.delta import uploads
    from lamina.manager.services import machines

    h = open_home(home)
    with h.session() as session:
        machines.get(session, name)
        uploads.discard_delta(h, name)
        machines.remove(session, name=name)
    shutil.rmtree(h.deltas_dir / name, ignore_errors=True)
    if as_json:
        emit_json({"removed": name})
    else:
        out.print(f"removed {name}")


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
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn a machine's delta into a new image version."""
    from lamina.manager.services.commit import commit_delta

    h = open_home(home)
    result = commit_delta(h, machine=machine, image=as_image, repin=repin)
    if as_json:
        emit_json(result)
    else:
        out.print(result["ref"])
