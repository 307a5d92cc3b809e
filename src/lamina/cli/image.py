"""lamina image import|export|list|log|rm"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from lamina.cli.common import (
    CaOpt,
    HomeOpt,
    JsonOpt,
    ManagerOpt,
    TokenOpt,
    admin,
    each,
    emit_json,
    human,
    open_home,
    out,
    progress,
    say,
    table,
)
from lamina.names import check_name, parse_ref
from lamina.units import timestamp

app = typer.Typer(help="Block images and their versions.", no_args_is_help=True)

FormatOpt = Annotated[
    str | None,
    typer.Option("--format", "-f", help="raw, qcow2, vmdk, vhdx or vpc (detected when omitted)."),
]


@app.command("import")
def import_(
    name: Annotated[str, typer.Argument(help="Image name; each import adds NAME@N+1.")],
    file: Annotated[Path, typer.Argument(help="Disk image file.")],
    fmt: FormatOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a disk image as a new version; prints NAME@VERSION ("unchanged, NAME@N" when
    a version of NAME has this very content already).

    Example: lamina image import win-golden ./golden.qcow2
    """
    from lamina.manager.services import images

    started = time.monotonic()
    h = open_home(home)
    h.warm_database()  # SQLAlchemy loads and migrates while the file is being chunked
    check_name(name, "image name")
    size = file.stat().st_size if file.is_file() else None
    with progress(f"import {file.name}", size, enabled=not as_json) as advance:
        done = images.import_image(
            store=h.store,
            session=h.session,
            name=name,
            path=file,
            fmt=fmt,
            tmp_dir=h.tmp_dir,
            progress=advance,
        )
    stats = done.imported.stats
    if as_json:
        emit_json(
            {
                "ref": done.ref,
                "name": name,
                "version": parse_ref(done.ref).version,
                "unchanged": done.unchanged,
                "size": stats.size,
                "format": stats.source_format,
                "bytes_read": stats.bytes_read,
                "chunks": stats.chunks,
                "new_chunks": stats.new_chunks,
                "stored_bytes": stats.stored_bytes,
                "manifest": done.imported.manifest_id.hex(),
                "seconds": round(time.monotonic() - started, 3),
            }
        )
    else:
        say(f"unchanged, {done.ref}" if done.unchanged else done.ref)


@app.command("export")
def export(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION (latest when omitted).")],
    dest: Annotated[Path, typer.Argument(metavar="OUT", help="Output file.")],
    fmt: Annotated[
        str,
        typer.Option("--format", "-f", help="raw (sparse), qcow2, vmdk, vhdx or vpc."),
    ] = "raw",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write an image version to a file, in any format import takes.

    Example: lamina image export base@2 base.vmdk --format vmdk
    """
    h = open_home(home)
    from lamina.manager.services import images

    with h.session() as session:
        version = images.get_version(session, parse_ref(ref, "image name"))
        manifest = images.load_manifest(h.store, version)
        full = version.ref
    with progress(f"export {full}", manifest.size, enabled=not as_json) as advance:
        from lamina.image import export_image

        export_image(h.store, manifest, dest, fmt=fmt, progress=advance)
    if as_json:
        emit_json({"ref": full, "out": str(dest), "format": fmt, "size": manifest.size})
    else:
        out.print(f"{full} -> {dest}")


@app.command("list")
def list_(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Images with their latest version.

    Example: lamina image list --json
    """
    h = open_home(home)
    from lamina.manager.services import images

    with h.session(read_only=True) as session:
        rows: list[dict[str, Any]] = [
            {
                "name": i.name,
                "versions": len(i.versions),
                "latest": i.versions[-1].version if i.versions else None,
                "size": i.versions[-1].size if i.versions else 0,
            }
            for i in images.list_images(session)
        ]
    if as_json:
        emit_json(rows)
        return
    table(
        ["NAME", "VERSIONS", "LATEST", "SIZE"],
        [[r["name"], r["versions"], f"{r['name']}@{r['latest']}", human(r["size"])] for r in rows],
    )


@app.command("log")
def log(
    name: Annotated[str, typer.Argument(help="Image name.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Versions of an image: logical size, stored bytes, bytes unique to each version.

    Example: lamina image log win-golden
    """
    h = open_home(home)
    from lamina.manager.services import images

    with h.session(read_only=True) as session:
        versions = images.list_versions(session, name=name)
        usage = {u.ref: u for u in images.usage(session, store=h.store, name=name)}
        rows: list[dict[str, Any]] = [
            {
                "ref": v.ref,
                "version": v.version,
                "size": v.size,
                "stored_bytes": usage[v.ref].stored,
                "unique_bytes": usage[v.ref].unique,
                "added_bytes": v.stored_bytes,
                "created": timestamp(v.created_at),
                "source": v.source,
            }
            for v in versions
        ]
    if as_json:
        emit_json(rows)
        return
    table(
        ["VERSION", "SIZE", "STORED", "UNIQUE", "CREATED", "SOURCE"],
        [
            [
                r["ref"],
                human(r["size"]),
                human(r["stored_bytes"]),
                human(r["unique_bytes"]),
                r["created"],
                r["source"],
            ]
            for r in rows
        ],
    )


@app.command("rm")
def rm(
    refs: Annotated[
        list[str],
        typer.Argument(metavar="REF...", help="NAME (every version) or NAME@VERSION."),
    ],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove an image or one version, none pinned by a machine (chunks are freed by
    `lamina store gc`).

    Example: lamina image rm win-golden@1 win-golden@2
    """
    ops = admin(home, manager, token, ca)
    each(refs, ops.remove_image, as_json)
