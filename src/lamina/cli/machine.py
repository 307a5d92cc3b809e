"""lamina machine add|list|show|set|reset|move|rm|libvirt|qemu, and lamina delta commit.

Every command but ``list`` works on the --home's database or through --manager's API, by
the one code path of ``lamina.manager.admin``: the same rules, output and refusals
(``move`` works on the home of the machine's block server, where its delta is).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
    each,
    emit_json,
    fields,
    human,
    open_home,
    say,
    table,
)
from lamina.units import timestamp

if TYPE_CHECKING:
    from lamina.home import Home

app = typer.Typer(help="Machines: identity, pinned image version, delta.", no_args_is_help=True)
delta_app = typer.Typer(help="Machine deltas.", no_args_is_help=True)
app.command("credentials")(credentials.machine_credentials)
app.command("token")(credentials.machine_token)


ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Extra #cloud-config YAML file.")]


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
    config: ConfigOpt = None,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a machine pinned to an image version; --json shows its agent token.

    Example: lamina machine add desk-001 --image base --mode stateful --config site.yaml
    """
    from lamina.identity import parse_extra_config
    from lamina.manager.schemas import MachineCreate, build

    body = build(
        MachineCreate,
        name=name,
        image=image,
        mode=mode,
        hostname=hostname,
        mac=mac,
        domain=domain,
        extra_config=parse_extra_config(config.read_text()) if config is not None else None,
    )
    added = admin(home, manager, token, ca).add_machine(body)
    emit_json(added) if as_json else say(added.summary())


@app.command("list")
def list_(
    image: Annotated[str | None, typer.Option("--image", help="Only machines of IMAGE.")] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help="Only stateless or stateful machines.")
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            "--state", help="Only machines never booted (new), booted, or with a user (in-use)."
        ),
    ] = None,
    new: Annotated[
        bool, typer.Option("--new", help="Devices that asked to boot and are no machine yet.")
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Machines with their image version, mode, delta size (and block server).

    Example: lamina machine list --image base --state in-use
    """
    from lamina.delta.file import BLOCK, delta_usage
    from lamina.manager.services import fleet, servers

    h = open_home(home)
    if new:
        _list_new(h, as_json)
        return
    rows: list[dict[str, Any]] = []
    with h.session(read_only=True) as session:
        server_names = {s.id: s.name for s in servers.all_servers(session)}
        found, _ = fleet.list_machines(session, image=image, mode=mode, state=state, limit=1 << 30)
        for m in found:
            blocks, stored = delta_usage(h.deltas_dir / m.name)
            rows.append(
                {
                    "name": m.name,
                    "image": m.image_version.ref,
                    "mode": m.mode,
                    "hostname": m.hostname,
                    "fqdn": m.fqdn,
                    "mac": m.mac,
                    "last_boot_at": timestamp(m.last_boot_at) if m.last_boot_at else None,
                    "delta_bytes": blocks * BLOCK,
                    "delta_stored_bytes": stored,
                    "server": server_names.get(m.server_id) if m.server_id else None,
                }
            )
    if as_json:
        emit_json(rows)
        return
    columns = ["NAME", "IMAGE", "MODE", "HOSTNAME", "MAC", "LAST BOOT", "DELTA"]
    cells = [
        [
            r["name"],
            r["image"],
            r["mode"],
            r["fqdn"],
            r["mac"],
            r["last_boot_at"] or "never",
            human(r["delta_bytes"]),
        ]
        for r in rows
    ]
    if server_names:  # a cluster: which block server serves each
        columns.append("SERVER")
        for cell, r in zip(cells, rows, strict=True):
            cell.append(r["server"] or "-")
    table(columns, cells)


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
    name: Annotated[str, typer.Argument()],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Everything about one machine, identity included, as key: value lines.

    Example: lamina machine show desk-001
    """
    detail = admin(home, manager, token, ca).show_machine(name)
    if as_json:
        emit_json(detail)
        return
    fields(detail.model_dump(mode="json"))


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
    config: ConfigOpt = None,
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
    delta is kept unless --force: re-pinning discards it). Asking for what it already
    has changes nothing and says "unchanged".

    Example: lamina machine set desk-001 --image base@3 --force
    """
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
    ops = admin(home, manager, token, ca)
    before = ops.show_machine(name)
    changed = ops.change_machine(name, body, force=force)
    same = _settled(before) == _settled(changed)
    if as_json:
        emit_json({**changed.model_dump(mode="json"), "changed": not same})
    else:
        say(f"{name}: unchanged" if same else changed.summary())


def _settled(detail: Any) -> tuple[Any, ...]:
    """What a change can change: the pin, the mode, the identity (its revision)."""
    return detail.image, detail.mode, detail.identity_rev


@app.command("reset")
def reset(
    names: Annotated[list[str], typer.Argument(metavar="NAME...")],
    force: ForceOpt = False,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Discard machines' deltas: they boot the pristine image version again (a stateful
    machine's data needs --force).

    Example: lamina machine reset desk-001 desk-002
    """
    ops = admin(home, manager, token, ca)
    each(names, lambda name: ops.reset_machine(name, force=force), as_json)


@app.command("move")
def move(
    name: Annotated[str, typer.Argument()],
    to: Annotated[str, typer.Option("--to", help="The block server to serve it from.")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="A stateful machine of a lost server: move it without its delta."
        ),
    ] = False,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve a machine from another block server from its next boot; a stateful
    machine's delta goes with it through the store (committed as NAME.state@N, the
    machine re-pinned to it). Run it on the home of the machine's current server (or
    with --manager, on that server's manager).

    Example: lamina machine move desk-007 --to server-b
    """
    from lamina.manager import schemas as s

    ops = admin(home, manager, token, ca)
    each([name], lambda n: ops.move_machine(n, s.MachineMove(to=to), force=force), as_json)


@app.command("rm")
def rm(
    names: Annotated[list[str], typer.Argument(metavar="NAME...")],
    force: ForceOpt = False,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove machines and their deltas (a stateful machine's data needs --force).

    Example: lamina machine rm desk-001 desk-002 desk-003
    """
    ops = admin(home, manager, token, ca)
    each(names, lambda name: ops.remove_machine(name, force=force), as_json)


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
    an existing version's content, answers "unchanged, NAME@N").

    Example: lamina delta commit desk-001 --as win-golden --repin
    """
    from lamina.manager.schemas import DeltaCommit, build

    body = build(DeltaCommit, image=as_image, repin=repin)
    done = admin(home, manager, token, ca).commit_delta(machine, body)
    emit_json(done) if as_json else say(done.summary())


ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="HOST:PORT the hypervisor reaches lamina serve's NBD at; default: serve.nbd of"
        " the configuration, a wildcard address as this host's name.",
        show_default=False,
    ),
]
TlsOpt = Annotated[
    bool | None,
    typer.Option(
        "--tls/--no-tls",
        help="NBD over TLS; default: as the server, on for an address that is not loopback.",
        show_default=False,
    ),
]
MemoryOpt = Annotated[int, typer.Option("--memory", help="MiB of guest memory.")]
VcpusOpt = Annotated[int, typer.Option("--vcpus", help="Virtual CPUs.")]


def _target(
    name: str, memory: int, vcpus: int, server: str | None, tls: bool | None, ops: Any
) -> tuple[Any, Any]:
    """The machine as a guest, and the NBD endpoint its hypervisor dials."""
    from lamina.manager.services.hypervisor import Guest, endpoint

    detail = ops.show_machine(name)
    # in a cluster, the block server the machine is assigned to (machine show names it)
    nbd = endpoint(server or detail.nbd_server, tls=tls)
    return Guest(detail.name, detail.mac, memory, vcpus), nbd


@app.command("libvirt")
def libvirt(
    name: Annotated[str, typer.Argument(help="Machine name.")],
    server: ServerOpt = None,
    tls: TlsOpt = None,
    network: Annotated[
        str, typer.Option("--network", help="libvirt network of the NIC.")
    ] = "default",
    memory: MemoryOpt = 2048,
    vcpus: VcpusOpt = 2,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
) -> None:
    """Print a libvirt domain for the machine: its disk and seed over NBD, its MAC.

    Example: lamina machine libvirt desk-001 --server lamina.corp:10809 > desk-001.xml
    && virsh define desk-001.xml
    """
    from lamina.manager.services.hypervisor import libvirt_domain

    guest, nbd = _target(name, memory, vcpus, server, tls, admin(home, manager, token, ca))
    sys.stdout.write(libvirt_domain(guest, nbd, network=network))


@app.command("qemu")
def qemu(
    name: Annotated[str, typer.Argument(help="Machine name.")],
    server: ServerOpt = None,
    tls: TlsOpt = None,
    credentials_dir: Annotated[
        Path | None,
        typer.Option(
            "--credentials",
            help="Folder of the machine's TLS credential (lamina machine credentials NAME"
            " --out DIR); implies --tls.",
        ),
    ] = None,
    memory: MemoryOpt = 2048,
    vcpus: VcpusOpt = 2,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the qemu command line that boots the machine from lamina (--json: its
    arguments as a list).

    Example: lamina machine qemu desk-001 --credentials /etc/lamina/desk-001
    """
    import shlex

    from lamina.manager.services.hypervisor import qemu_argv

    if credentials_dir is not None and tls is None:
        tls = True  # a credential is given to be used
    guest, nbd = _target(name, memory, vcpus, server, tls, admin(home, manager, token, ca))
    creds = credentials_dir.expanduser().absolute() if credentials_dir else None
    argv = qemu_argv(guest, nbd, credentials=creds)
    if as_json:
        emit_json(argv)
        return
    # one option and its value per line, ready to paste
    parts, i = [shlex.quote(argv[0])], 1
    while i < len(argv):
        takes = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        parts.append(" ".join(shlex.quote(a) for a in argv[i : i + 1 + takes]))
        i += 1 + takes
    sys.stdout.write(" \\\n    ".join(parts) + "\n")
