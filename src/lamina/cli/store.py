"""lamina store verify|gc|du|reindex"""

from __future__ import annotations

import typer

from lamina.cli.common import HomeOpt, JsonOpt, emit_json, err, human, open_home, out, progress
from lamina.errors import CorruptObject
from lamina.home import Home

app = typer.Typer(help="The content-addressed chunk store.", no_args_is_help=True)


@app.command()
def verify(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Re-hash every chunk; name each corrupt one (exit 7 when any is found).

    Example: lamina store verify
    """
    h = open_home(home)
    total = h.store.usage().pack_bytes
    with progress("verify", total, enabled=not as_json) as advance:
        report = h.store.verify(advance)
    missing = _missing_references(h)
    problems = report.corrupt + missing
    if as_json:
        emit_json(
            {
                "ok": not problems,
                "packs": report.packs,
                "chunks": report.chunks,
                "bytes": report.bytes,
                "corrupt": [{"id": c, "reason": r} for c, r in problems],
            }
        )
    else:
        for cid, reason in problems:
            err.print(f"corrupt {cid}: {reason}")
        out.print(
            f"{report.chunks} chunks in {report.packs} packs ({human(report.bytes)}): "
            + ("ok" if not problems else f"{len(problems)} problem(s)")
        )
    if problems:
        raise CorruptObject(f"store verify found {len(problems)} problem(s)")


def _missing_references(h: Home) -> list[tuple[str, str]]:
    from lamina.manager.services.store import missing_references

    with h.session() as session:
        return missing_references(session, store=h.store)


@app.command()
def gc(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Remove chunks no manifest references (waits for running imports).

    Example: lamina store gc
    """
    h = open_home(home)
    from lamina.manager.services.store import live_chunks

    def live() -> set[bytes]:
        with h.session() as session:
            return live_chunks(session, store=h.store)

    with progress("gc", h.store.usage().pack_bytes, enabled=not as_json) as advance:
        report = h.store.gc(live, advance)
    if as_json:
        emit_json(
            {
                "chunks_removed": report.chunks_removed,
                "packs_removed": report.packs_removed,
                "packs_rewritten": report.packs_rewritten,
                "bytes_freed": report.bytes_freed,
            }
        )
    else:
        out.print(
            f"removed {report.chunks_removed} chunks, freed {human(report.bytes_freed)} "
            f"({report.packs_removed} packs removed, {report.packs_rewritten} rewritten)"
        )


@app.command()
def du(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Store usage: packs, chunks, stored bytes, logical bytes and dedup ratio.

    Example: lamina store du --json
    """
    from lamina.manager.services.store import logical_bytes

    h = open_home(home)
    usage = h.store.usage()
    with h.session() as session:
        roots, logical = logical_bytes(session, store=h.store)
    ratio = logical / usage.pack_bytes if usage.pack_bytes else 0.0
    data = {
        "packs": usage.packs,
        "chunks": usage.chunks,
        "stored_bytes": usage.pack_bytes,
        "versions": roots,
        "logical_bytes": logical,
        "dedup_ratio": round(ratio, 2),
    }
    if as_json:
        emit_json(data)
    else:
        out.print(
            f"{usage.chunks} chunks in {usage.packs} packs: {human(usage.pack_bytes)} stored for "
            f"{human(logical)} in {roots} image and layer version(s) ({ratio:.1f}x)"
        )


@app.command()
def reindex(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Index the packs the chunk index does not know (all of them in a fresh home over a
    bucket), reading only their trailers; forget packs that are gone.

    Example: lamina store reindex
    """
    h = open_home(home)
    changes = h.store.reindex()
    usage = h.store.usage()
    if as_json:
        emit_json({"changes": changes, "packs": usage.packs, "chunks": usage.chunks})
    else:
        out.print(f"{usage.chunks} chunks in {usage.packs} packs indexed ({changes} change(s))")
