"""lamina store verify|gc|du|reindex"""

from __future__ import annotations

from typing import Annotated

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
def gc(
    home: HomeOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be removed; change nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove chunks no version references (waits for running imports). Manifests the
    database neither knows nor removed stay, with their chunks: `store reindex` lists them.

    Example: lamina store gc --dry-run
    """
    from lamina.manager.services import recovery
    from lamina.manager.services.store import live_chunks

    h = open_home(home)
    kept: list[recovery.FoundRoot] = []

    def live() -> set[bytes]:
        with h.session() as session:
            return live_chunks(session, store=h.store)

    def spare(dead: list[bytes]) -> set[bytes]:
        with h.session(read_only=True) as session:
            kept.extend(recovery.unknown_roots(session, h.store, dead))
        return set().union(*({r.manifest_id} | r.references for r in kept))

    with progress("gc", h.store.usage().pack_bytes, enabled=not as_json) as advance:
        report = h.store.gc(live, advance, spare=spare, dry_run=dry_run)
    if not dry_run:
        with h.session() as session:
            recovery.forget_collected(session, h.store)
    unknown = [f"{r.kind} {r.manifest_id.hex()}" for r in kept]
    if as_json:
        emit_json(
            {
                "dry_run": dry_run,
                "chunks_removed": report.chunks_removed,
                "packs_removed": report.packs_removed,
                "packs_rewritten": report.packs_rewritten,
                "bytes_freed": report.bytes_freed,
                "packs_condemned": report.packs_condemned,
                "packs_pardoned": report.packs_pardoned,
                "chunks_kept_unknown": report.chunks_spared,
                "unknown_manifests": unknown,
            }
        )
        return
    verb = ("would remove", "would free") if dry_run else ("removed", "freed")
    out.print(
        f"{verb[0]} {report.chunks_removed} chunks, {verb[1]} {human(report.bytes_freed)} "
        f"({report.packs_removed} packs removed, {report.packs_rewritten} rewritten"
        + (f", {report.packs_condemned} condemned" if report.packs_condemned else "")
        + (f", {report.packs_pardoned} pardoned" if report.packs_pardoned else "")
        + ")"
    )
    if kept:
        err.print(
            f"kept {len(kept)} manifest(s) the database does not know and their chunks "
            f"({report.chunks_spared} unreferenced): `lamina store reindex` lists them as versions",
            markup=False,
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
    """Rebuild what the packs can tell: the chunk index (all of it in a fresh home over a
    bucket), and a version for every manifest the database neither knows nor removed
    (all of them when the database was lost: it is made anew).

    Example: lamina store reindex
    """
    from lamina.home import home_path
    from lamina.manager.home import open_home as open_or_create
    from lamina.manager.services import recovery
    from lamina.manager.services.store import live_chunks

    h = open_or_create(home_path(home), opening="create")
    changes = h.store.reindex()
    with h.session(read_only=True) as session:
        live = live_chunks(session, store=h.store)
        candidates = [cid for cid, _ in h.store.index.all_chunks() if cid not in live]
        found = recovery.unknown_roots(session, h.store, candidates)
    with h.session() as session:
        recovered = [recovery.record(session, h.store, root) for root in found]
    usage = h.store.usage()
    if as_json:
        emit_json(
            {
                "changes": changes,
                "packs": usage.packs,
                "chunks": usage.chunks,
                "recovered": recovered,
            }
        )
        return
    out.print(f"{usage.chunks} chunks in {usage.packs} packs indexed ({changes} change(s))")
    for ref in recovered:
        out.print(f"recovered {ref}", markup=False)
