"""lamina init, lamina backup DEST, lamina restore SRC"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lamina.cli.common import HomeOpt, JsonOpt, emit_json, human, out


def register(root: typer.Typer) -> None:
    root.command("init")(init)
    root.command("backup")(backup)
    root.command("restore")(restore)


def init(
    join: Annotated[
        bool,
        typer.Option(
            "--join",
            help="Another block server's folder of the home whose PostgreSQL"
            " (LAMINA_DATABASE_URL) this is: take its id.",
        ),
    ] = False,
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            help="A folder with a copy of the certificate authority the cluster's servers"
            " share (ca-cert.pem, ca-key.pem from the first server's HOME/tls): install it.",
        ),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a folder a lamina home (its identity and database); on a home, check it.

    Example: lamina init --home /var/lib/lamina
    Example: lamina init --join --ca /root/cluster-ca   (another block server)
    """
    from lamina.manager.home import init_home

    done = init_home(home, join=join, ca=ca)
    h = done.home
    if as_json:
        emit_json(
            {
                "home": str(h.root),
                "id": h.id,
                "created": done.created,
                "adopted": done.adopted,
                "ca_taken": done.ca_taken,
            }
        )
    elif done.adopted:
        out.print(f"adopted {h.root} as a lamina home (id {h.id})", markup=False)
    elif done.created:
        out.print(f"initialized lamina home {h.root} (id {h.id})", markup=False)
    else:
        out.print(f"{h.root} is a lamina home already (id {h.id})", markup=False)
    if done.ca_taken and not as_json:
        out.print(f"installed the certificate authority in {h.tls_dir}", markup=False)


def backup(
    dest: Annotated[Path, typer.Argument(help="A new or empty folder, or an earlier backup.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A consistent copy of a home, also while `lamina serve` runs on it.

    Example: lamina backup /srv/backup/lamina-monday
    """
    from lamina.cli.common import open_home
    from lamina.manager.backup import make_backup

    report = make_backup(open_home(home), dest)
    if as_json:
        emit_json(report.to_json())
    else:
        out.print(
            f"backed up {report.home} to {report.dest}: database, {report.packs} packs "
            f"({human(report.pack_bytes)} copied), {len(report.deltas)} deltas",
            markup=False,
        )


def restore(
    src: Annotated[Path, typer.Argument(help="A folder made by `lamina backup`.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bring a backup back into a new home, or into its own home whose database was lost.

    Example: lamina restore /srv/backup/lamina-monday --home /var/lib/lamina
    """
    from lamina.home import home_path
    from lamina.manager.backup import restore_backup

    report = restore_backup(src, home_path(home))
    if as_json:
        emit_json(report.to_json())
    else:
        out.print(
            f"restored {report.src} into {report.home}: database, {report.packs} packs, "
            f"{len(report.deltas)} deltas",
            markup=False,
        )
