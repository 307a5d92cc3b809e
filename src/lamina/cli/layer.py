"""lamina layer import|capture|list|log|export|diff|rm"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

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
    err,
    human,
    open_home,
    out,
    progress,
    say,
    table,
)
from lamina.names import parse_ref
from lamina.units import timestamp

app = typer.Typer(
    help="File-tree layers: base OS, applications, writable layers.", no_args_is_help=True
)

AllowDevices = Annotated[
    bool, typer.Option("--allow-devices", help="Accept device nodes from the source.")
]
AllowSetuid = Annotated[
    bool, typer.Option("--allow-setuid", help="Accept setuid/setgid files from the source.")
]


@app.command("import")
def import_(
    name: Annotated[str, typer.Argument(help="Layer name; each import adds NAME@N+1.")],
    src: Annotated[
        Path, typer.Argument(help="Directory, tar (.gz/.zst/...), OCI layout or docker archive.")
    ],
    allow_devices: AllowDevices = False,
    allow_setuid: AllowSetuid = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a file tree as a new layer version; prints NAME@VERSION ("unchanged, NAME@N"
    when the newest version with this very tree is NAME@N).

    Example: lamina layer import office ./office-tree
    """
    from lamina.layer.importer import import_layer
    from lamina.manager.layer_records import DatabaseRecords

    started = time.monotonic()
    h = open_home(home)
    h.warm_database()
    records = DatabaseRecords(h)
    with progress(f"import {src.name}", None, enabled=not as_json) as advance:
        ref, imported = import_layer(
            h,
            records,
            name,
            src,
            allow_devices=allow_devices,
            allow_setuid=allow_setuid,
            progress=advance,
        )
    if as_json:
        emit_json(
            {
                "ref": ref,
                "name": name,
                "version": parse_ref(ref).version,
                "unchanged": ref in records.unchanged,
                "files": imported.files,
                "size": imported.size,
                "new_chunks": imported.new_chunks,
                "stored_bytes": imported.stored_bytes,
                "manifest": imported.manifest_id.hex(),
                "seconds": round(time.monotonic() - started, 3),
            }
        )
    else:
        say(f"unchanged, {ref}" if ref in records.unchanged else ref)


@app.command("capture", context_settings={"allow_extra_args": True})
def capture(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Layer to add the captured version to.")],
    on: Annotated[list[str], typer.Option("--on", help="Layer to run on (repeat; first wins).")],
    keep_caches: Annotated[
        bool,
        typer.Option("--keep-caches", help="Keep package-manager caches (apt lists, archives)."),
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run `-- COMMAND...` chrooted on the layers; keep only what it changed.

    Example: lamina layer capture htop --on base -- apt-get install -y htop
    """
    from lamina.layer.capture import capture as run_capture
    from lamina.manager.layer_records import DatabaseRecords

    h = open_home(home)
    result = run_capture(h, DatabaseRecords(h), name, on, list(ctx.args), keep_caches=keep_caches)
    if as_json:
        emit_json(
            {
                "ref": result.ref,
                "bases": result.bases,
                "files": result.imported.files,
                "size": result.imported.size,
                "stored_bytes": result.imported.stored_bytes,
                "prepared": result.prepared,
                "caches_left_out": result.left_out,
            }
        )
    else:
        out.print(result.ref)


@app.command("list")
def list_(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Layers with their latest version.

    Example: lamina layer list
    """
    h = open_home(home)
    from lamina.manager.services import layers as svc

    with h.session() as session:
        rows: list[dict[str, Any]] = [
            {
                "name": layer.name,
                "kind": layer.kind,
                "versions": len(layer.versions),
                "latest": layer.versions[-1].version if layer.versions else None,
                "files": layer.versions[-1].files if layer.versions else 0,
                "size": layer.versions[-1].size if layer.versions else 0,
            }
            for layer in svc.list_layers(session)
        ]
    if as_json:
        emit_json(rows)
        return
    table(
        ["NAME", "KIND", "VERSIONS", "LATEST", "FILES", "SIZE"],
        [
            [
                r["name"],
                r["kind"],
                r["versions"],
                f"{r['name']}@{r['latest']}" if r["latest"] else "-",
                r["files"],
                human(r["size"]),
            ]
            for r in rows
        ],
    )


@app.command("log")
def log(
    name: Annotated[str, typer.Argument(help="Layer name.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Versions of a layer: files, size, bytes added, what each was made on.

    Example: lamina layer log office
    """
    h = open_home(home)
    from lamina.manager.services import layers as svc

    with h.session() as session:
        rows: list[dict[str, Any]] = [
            {
                "ref": v.ref,
                "version": v.version,
                "files": v.files,
                "size": v.size,
                "stored_bytes": v.stored_bytes,
                "bases": [b.base_ref for b in v.bases],
                "parent": f"{v.layer.name}@{_parent_version(session, v.parent_id)}"
                if v.parent_id
                else None,
                "policy": v.policy,
                "created": timestamp(v.created_at),
                "source": v.source,
                "manifest": v.manifest_id,
            }
            for v in svc.list_versions(session, name=name)
        ]
    if as_json:
        emit_json(rows)
        return
    table(
        ["VERSION", "FILES", "SIZE", "ADDED", "BASES", "CREATED", "SOURCE"],
        [
            [
                r["ref"],
                r["files"],
                human(r["size"]),
                human(r["stored_bytes"]),
                ",".join(r["bases"]) or "-",
                r["created"],
                r["source"],
            ]
            for r in rows
        ],
    )


def _parent_version(session: Any, version_id: int) -> int:
    from lamina.manager.models import LayerVersion

    return int(session.get_one(LayerVersion, version_id).version)


@app.command("export")
def export(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION (latest when omitted).")],
    dest: Annotated[Path, typer.Argument(metavar="DIR", help="New or empty directory.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a layer version out as files (whiteouts as 0/0 devices, as overlayfs reads).

    Example: lamina layer export office@2 ./office-v2
    """
    h = open_home(home)
    from lamina.layer.importer import load_tree
    from lamina.layer.materialize import materialize
    from lamina.manager.services import layers as svc

    with h.session() as session:
        version = svc.get_version(session, parse_ref(ref, "layer name"))
        full, manifest = version.ref, version.manifest_id
    tree = load_tree(h.store, bytes.fromhex(manifest))
    dest.mkdir(parents=True, exist_ok=True)
    with progress(f"export {full}", tree.data_bytes, enabled=not as_json) as advance:
        materialize(h.store, tree, dest, progress=advance)
    if as_json:
        emit_json({"ref": full, "dir": str(dest), "files": len(tree), "size": tree.data_bytes})
    else:
        out.print(f"{full} -> {dest}")


@app.command("diff")
def diff(
    a: Annotated[str, typer.Argument(help="NAME[@VERSION]")],
    b: Annotated[str, typer.Argument(help="NAME[@VERSION]")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Paths added (A), removed (D) and changed (M) from the first version to the second.

    Example: lamina layer diff office@1 office@2
    """
    h = open_home(home)
    from lamina.layer.changes import diff as tree_diff
    from lamina.layer.importer import load_tree
    from lamina.manager.services import layers as svc

    with h.session() as session:
        va = svc.get_version(session, parse_ref(a, "layer name"))
        vb = svc.get_version(session, parse_ref(b, "layer name"))
        refs, manifests = (va.ref, vb.ref), (va.manifest_id, vb.manifest_id)
    ta, tb = (load_tree(h.store, bytes.fromhex(m)) for m in manifests)
    d = tree_diff(ta, tb)
    if as_json:
        emit_json(
            {
                "from": refs[0],
                "to": refs[1],
                # paths as the text shows them: absolute in the composed root
                "added": [f"/{p}" for p in d.added],
                "removed": [f"/{p}" for p in d.removed],
                "changed": [f"/{p}" for p in d.changed],
            }
        )
        return
    lines = (
        [("A", p) for p in d.added] + [("D", p) for p in d.removed] + [("M", p) for p in d.changed]
    )
    for mark, path in sorted(lines, key=lambda x: x[1]):
        out.print(f"{mark} /{path}", markup=False)
    if not lines:
        err.print(f"{refs[0]} and {refs[1]} have the same files")


@app.command("rm")
def rm(
    refs: Annotated[
        list[str],
        typer.Argument(metavar="REF...", help="NAME (every version) or NAME@VERSION."),
    ],
    force: ForceOpt = False,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a layer or one version (chunks are freed by `lamina store gc`). A user's
    saved files (a writable layer's versions) or entitlements go only with --force; a
    layer that is mounted or held by a user's session is refused.

    Example: lamina layer rm office@1 office@2
    """
    ops = admin(home, manager, token, ca)
    each(refs, lambda ref: ops.remove_layer(ref, force=force), as_json)
