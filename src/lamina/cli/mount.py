"""lamina mount|umount|attach|detach: compose layers on a root with overlayfs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lamina.cli.common import HomeOpt, JsonOpt, emit_json, err, open_home, out

if TYPE_CHECKING:
    from lamina.layer.roots import Mounted

RootArg = Annotated[Path, typer.Argument(help="Directory to compose the layers on.")]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="Refuse when two app layers provide a path differently.")
]


def _as_dict(m: Mounted) -> dict[str, Any]:
    return {
        "root": m.root,
        "layers": m.layers,
        "writable": m.writable,
        "writable_version": m.writable_version,
        "policy": m.policy,
        "generation": m.generation,
        "conflicts": [
            {"path": "/" + c.path, "first": c.first, "second": c.second} for c in m.conflicts
        ],
        "prepared": m.prepared,
        "seconds": round(m.seconds, 4),
    }


def _report(m: Mounted, verb: str, as_json: bool) -> None:
    if as_json:
        emit_json(_as_dict(m))
        return
    for c in m.conflicts:
        err.print(f"conflict: /{c.path} differs in {c.first} (wins) and {c.second}", markup=False)
    for ref, seconds in m.prepared.items():
        err.print(f"prepared {ref} for this host in {seconds:.2f} s")
    writable = f" + {m.writable} ({m.policy})" if m.writable else ""
    out.print(f"{verb} {m.root}: {', '.join(m.layers)}{writable}", markup=False)


def mount(
    root: RootArg,
    layer: Annotated[
        list[str],
        typer.Option("--layer", "-l", help="NAME[@V], repeat; first wins, last is the base."),
    ],
    writable: Annotated[
        str | None, typer.Option("--writable", "-w", help="Writable layer kept across mounts.")
    ] = None,
    policy: Annotated[
        str, typer.Option("--policy", help="What the writable layer keeps: all, profile or apps.")
    ] = "all",
    strict: StrictOpt = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compose layers on ROOT with overlayfs (changes kept in --writable, if given).

    Example: lamina mount /mnt/alice --layer base-apps --layer office --writable writable-alice
    """
    from lamina.errors import UsageError
    from lamina.layer import roots
    from lamina.layer.changes import WritablePolicy
    from lamina.manager.layer_records import DatabaseRecords

    if policy not in {p.value for p in WritablePolicy}:
        raise UsageError(f"unknown policy {policy!r} (all, profile or apps)")
    h = open_home(home)
    records = DatabaseRecords(h)
    result = roots.mount(h, records, root, layer, writable=writable, policy=policy, strict=strict)
    _report(result, "mounted", as_json)


def umount(root: RootArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Unmount ROOT; the writable layer keeps what its policy keeps, as a new version.

    Example: lamina umount /mnt/alice
    """
    from lamina.layer import roots
    from lamina.manager.layer_records import DatabaseRecords

    h = open_home(home)
    result = roots.umount(h, DatabaseRecords(h), root)
    if as_json:
        emit_json(
            {
                "root": result.root,
                "writable": result.writable,
                "saved": result.saved,
                "kept": result.kept,
                "dropped": ["/" + p for p in result.dropped],
            }
        )
        return
    if result.writable is None:
        out.print(f"unmounted {result.root} (changes discarded)")
    elif result.saved is None:
        out.print(f"unmounted {result.root}: {result.writable} unchanged")
    else:
        dropped = f", {len(result.dropped)} dropped by policy" if result.dropped else ""
        out.print(f"unmounted {result.root}: saved {result.saved} ({result.kept} kept{dropped})")


def attach(
    root: RootArg,
    layer: Annotated[str, typer.Argument(help="NAME[@V] to add on top of the app layers.")],
    strict: StrictOpt = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Attach a layer to a mounted ROOT, live (processes inside keep running).

    Example: lamina attach /mnt/alice office@2
    """
    from lamina.layer import attach
    from lamina.manager.layer_records import DatabaseRecords

    h = open_home(home)
    _report(attach.attach(h, DatabaseRecords(h), root, layer, strict=strict), "attached", as_json)


def detach(
    root: RootArg,
    layer: Annotated[str, typer.Argument(help="NAME or NAME@V to remove.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Detach a layer from a mounted ROOT, live.

    Example: lamina detach /mnt/alice office
    """
    from lamina.layer import attach
    from lamina.manager.layer_records import DatabaseRecords

    h = open_home(home)
    _report(attach.detach(h, DatabaseRecords(h), root, layer), "detached", as_json)


def register(root: typer.Typer) -> None:
    """Add the top-level verbs of this module to the root command."""
    root.command("mount")(mount)
    root.command("umount")(umount)
    root.command("attach")(attach)
    root.command("detach")(detach)
