"""lamina machine credentials NAME | lamina admin credentials: a TLS client credential
written under qemu's file names, with the qemu, libnbd and libvirt lines that use it.
lamina machine token NAME [--rotate]: a machine's agent token (HTTP)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lamina.cli.common import HomeOpt, JsonOpt, emit_json, open_home, out
from lamina.errors import UsageError
from lamina.files import write_atomic
from lamina.trust.authority import CA_CERT, CLIENT_CERT, CLIENT_DAYS, CLIENT_KEY, Issued
from lamina.trust.principal import Kind
from lamina.units import timestamp

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

OutOpt = Annotated[
    Path,
    typer.Option(
        "--out", help="Folder to write ca-cert.pem, client-cert.pem, client-key.pem into."
    ),
]
RotateOpt = Annotated[
    bool, typer.Option("--rotate", help="Revoke every earlier credential of this holder.")
]
TokenRotateOpt = Annotated[
    bool, typer.Option("--rotate", help="Replace the token: the old one is refused from now on.")
]
DaysOpt = Annotated[int, typer.Option("--days", help="Days the credential is valid.")]
ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="HOST:PORT of `lamina serve` for the printed lines [the machine's block server"
        " in a cluster, else this host:10809].",
    ),
]


def write(directory: Path, ca_pem: bytes, issued: Issued) -> None:
    """The three files qemu's ``tls-creds-x509,endpoint=client`` reads from ``dir``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(directory / CLIENT_KEY, issued.key_pem, mode=0o600)
    write_atomic(directory / CLIENT_CERT, issued.cert_pem, mode=0o644)
    write_atomic(directory / CA_CERT, ca_pem, mode=0o644)


def _server(server: str | None) -> tuple[str, int]:
    from lamina.serve.server import parse_address

    return parse_address(server or f"{socket.getfqdn()}:10809", "--server")


def _assigned(session: Session, machine: str) -> str | None:
    """The machine's block server in a cluster (None: this host's, as without one)."""
    from lamina.manager.services import servers

    found = servers.server_for(session, machine)
    return found.nbd_address if found else None


def _nbd(host: str, port: int, export: str) -> str:
    return f"driver=nbd,server.type=inet,server.host={host},server.port={port},export={export}"


def usage(directory: Path, host: str, port: int, exports: list[str]) -> dict[str, Any]:
    """How qemu, libnbd and libvirt use the credential in ``directory``."""
    d = str(directory)
    qemu = ["-object", f"tls-creds-x509,id=tls0,dir={d},endpoint=client"]
    for i, export in enumerate(exports):
        ro = ",read-only=on" if export.endswith("/seed") else ""
        qemu += ["-blockdev", f"{_nbd(host, port, export)},tls-creds=tls0,node-name=d{i}{ro}"]
        qemu += ["-device", f"virtio-blk-pci,drive=d{i}" + (",bootindex=0" if i == 0 else "")]
    url_host = f"[{host}]" if ":" in host else host
    uris = [f"nbds://{url_host}:{port}/{e}?tls-certificates={d}" for e in exports]
    disks = []
    for i, export in enumerate(exports):
        ro = "\n  <readonly/>" if export.endswith("/seed") else ""
        disks.append(
            "<disk type='network' device='disk'>\n"
            "  <driver name='qemu' type='raw'/>\n"
            f"  <source protocol='nbd' name='{export}' tls='yes'>\n"
            f"    <host name='{host}' port='{port}'/>\n"
            "  </source>\n"
            f"  <target dev='vd{chr(ord('a') + i)}' bus='virtio'/>{ro}\n"
            "</disk>"
        )
    return {"qemu": qemu, "nbd_uris": uris, "libvirt": disks}


def _show(holder: str, directory: Path, issued: Issued, lines: dict[str, Any]) -> None:
    args = lines["qemu"]
    text = [
        f"{holder}: credential in {directory} (until {issued.not_after:%Y-%m-%d})",
        "qemu:",
        *(f"  {args[i]} {args[i + 1]}" for i in range(0, len(args), 2)),
        "libnbd (nbdinfo, nbdcopy):",
        *(f"  '{uri}'" for uri in lines["nbd_uris"]),
        "libvirt (copy the three files into qemu.conf's nbd_tls_x509_cert_dir,"
        " /etc/pki/qemu by default, and set nbd_tls = 1):",
        *("  " + disk.replace("\n", "\n  ") for disk in lines["libvirt"]),
    ]
    for line in text:  # long lines stay whole: they are copied into command lines
        out.print(line, markup=False, soft_wrap=True)


def issue_and_write(
    home: Path | None,
    kind: Kind,
    name: str,
    directory: Path,
    *,
    rotate: bool,
    days: int,
    server: str | None,
    as_json: bool,
) -> None:
    from lamina.manager.services import cluster_ca, credentials

    h = open_home(home)
    authority = cluster_ca.authority(h)
    directory = directory.expanduser().absolute()
    with h.session() as session:
        issued = credentials.issue(session, authority, kind, name, days=days, rotate=rotate)
        # written before the commit: a credential recorded is one its holder has
        write(directory, authority.cert_pem, issued)
        if server is None and kind is Kind.MACHINE:
            server = _assigned(session, name)
    host, port = _server(server)
    exports = [f"machine/{name}", f"machine/{name}/seed"] if kind is Kind.MACHINE else []
    lines = usage(directory, host, port, exports or ["IMAGE"])
    holder = f"machine {name}" if kind is Kind.MACHINE else "admin"
    if as_json:
        emit_json(
            {
                "holder": holder,
                "dir": str(directory),
                "serial": format(issued.serial, "x"),
                "expires": timestamp(issued.not_after),
                "rotated": rotate,
                **lines,
            }
        )
    else:
        _show(holder, directory, issued, lines)


def machine_credentials(
    name: Annotated[str, typer.Argument(help="Machine name.")],
    directory: OutOpt,
    rotate: RotateOpt = False,
    days: DaysOpt = CLIENT_DAYS,
    server: ServerOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a TLS client credential that opens only machine NAME's disk, seed and image
    version (qemu's ca-cert.pem, client-cert.pem, client-key.pem); print how to use it.

    Example: lamina machine credentials desk-001 --out /etc/lamina/desk-001
    """
    issue_and_write(
        home,
        Kind.MACHINE,
        name,
        directory,
        rotate=rotate,
        days=days,
        server=server,
        as_json=as_json,
    )


def admin_credentials(
    directory: OutOpt,
    rotate: RotateOpt = False,
    days: DaysOpt = CLIENT_DAYS,
    server: ServerOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a TLS client credential that opens every export; print how to use it.

    Example: lamina admin credentials --out ~/.config/lamina/admin
    """
    issue_and_write(
        home, Kind.ADMIN, "admin", directory, rotate=rotate, days=days, server=server,
        as_json=as_json,
    )  # fmt: skip


def machine_token(
    name: Annotated[str, typer.Argument(help="Machine name.")],
    rotate: TokenRotateOpt = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show machine NAME's agent token (the one its seed disk carries to its agent);
    --rotate replaces it: the old one is refused from then on, and the machine's seed
    carries the new one from its next boot.

    Example: lamina machine token desk-001 --rotate
    """
    from lamina.manager.services import machines

    with open_home(home).session() as session:
        if rotate:
            value: str | None = machines.rotate_token(session, name=name)
        else:
            value = machines.seed_token(session, machines.get(session, name))
    if value is None:
        raise UsageError(f"{name}: its token was not derived here and cannot be shown (--rotate)")
    if as_json:
        emit_json({"name": name, "token": value, "rotated": rotate})
    else:
        out.print(value)
