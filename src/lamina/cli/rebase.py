"""lamina rebase WRITABLE --onto LAYER@V | --all --from LAYER@OLD --onto LAYER@NEW | policy"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from lamina.cli.common import HomeOpt, JsonOpt, emit_json, err, open_home, out, table
from lamina.errors import LaminaError, UsageError

if TYPE_CHECKING:
    from typer._click import Command, Context  # the click typer bundles

    from lamina.rebase.run import Bulk, Result

RUN = "run"
CONFLICT_ROWS = 20  # layers with conflicts listed by the text output of --all


class _DefaultRun(TyperGroup):
    """``lamina rebase ARGS`` runs the hidden ``run`` command unless ARGS start with a
    subcommand's name (``policy``): both forms of the contract and a noun for the table.
    A writable layer named like a subcommand is reached as ``lamina rebase run NAME ...``."""

    def resolve_command(
        self, ctx: Context, args: list[str]
    ) -> tuple[str | None, Command | None, list[str]]:
        if args and args[0] in self.commands:
            return super().resolve_command(ctx, args)
        return RUN, self.commands[RUN], args


app = typer.Typer(
    cls=_DefaultRun,
    no_args_is_help=True,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    help="""Re-apply writable layers' changes on a new version of a base layer (3-way merge).

    lamina rebase WRITABLE --onto LAYER@VERSION [--dry-run] [--json] [-v]

    lamina rebase --all --from LAYER@OLD --onto LAYER@NEW [--jobs N] [--dry-run] [--json]

    lamina rebase policy show | set GLOB RULE | rm GLOB | reset | which PATH

    Conflicts are reported, never fatal: the exit status is nonzero only on errors.
    See `lamina rebase run --help` for the options.""",
)
policy_app = typer.Typer(
    help="The per-path rule table (glob -> user | admin | merge; first match wins).",
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")


@app.command(RUN, hidden=True)
def run(
    writable: Annotated[
        str | None, typer.Argument(help="Writable layer (NAME, or NAME@V for its latest).")
    ] = None,
    onto: Annotated[
        str | None, typer.Option("--onto", help="The base layer's new version, LAYER@VERSION.")
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every writable layer made on --from.")
    ] = False,
    source: Annotated[
        str | None, typer.Option("--from", help="With --all: the old version, LAYER@OLD.")
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", min=1, help="Worker processes (--all).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Merge and report; store nothing.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="List every path, kept and applied too.")
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rebase one writable layer, or every one made on --from (--all).

    Example: lamina rebase run writable-alice --onto base@3
    """
    if onto is None:
        raise UsageError("rebase needs --onto LAYER@VERSION")
    h = open_home(home)
    if every:
        if writable is not None or source is None:
            raise UsageError("--all takes --from LAYER@OLD and no WRITABLE")
        _bulk(h, source, onto, jobs, dry_run, as_json)
        return
    if writable is None or source is not None:
        raise UsageError("give WRITABLE (or --all with --from)")
    from lamina.manager.rebase_records import DatabaseRebase
    from lamina.rebase.run import rebase_one

    result = rebase_one(h, DatabaseRebase(h), writable, onto, dry_run=dry_run)
    if as_json:
        emit_json(result.report_json() | {"dry_run": dry_run})
        return
    _print_one(result, verbose)


def _print_one(r: Result, verbose: bool) -> None:
    from lamina.rebase.report import text_lines

    if r.status == "already":
        err.print(r.error or f"{r.source}: nothing to do", markup=False)
        return
    head = r.ref if r.ref else "(dry run: nothing stored)"
    out.print(
        f"{r.source} -> {head}: {', '.join(r.old_bases)} -> {', '.join(r.new_bases)}",
        markup=False,
    )
    c = r.counts
    out.print(
        f"kept {c['kept']}, applied {c['applied']}, merged {c['merged']}, "
        f"conflicts {c['conflict']} (the update changed {c['update_changed']} paths)",
        markup=False,
    )
    for line in text_lines(list(r.items), everything=verbose):
        out.print(line, markup=False, soft_wrap=True)


@contextmanager
def _layers_bar(enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar counting layers on a terminal; nothing otherwise."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda _done, _total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[bold]rebase",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        console=err,
    ) as bar:
        task = bar.add_task("rebase", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _bulk(h: Any, source: str, onto: str, jobs: int | None, dry_run: bool, as_json: bool) -> None:
    from lamina.manager.rebase_records import DatabaseRebase
    from lamina.rebase.run import rebase_all

    records = DatabaseRebase(h)
    with _layers_bar(not as_json) as advance:
        bulk = rebase_all(h, records, source, onto, jobs=jobs, dry_run=dry_run, progress=advance)
    failed = bulk.by_status("failed")
    if as_json:
        emit_json(_bulk_json(bulk))
    else:
        _print_bulk(bulk)
    if bulk.interrupted:
        err.print("interrupted: run the same command again to rebase the rest", markup=False)
        raise typer.Exit(130)
    if failed:
        raise LaminaError(f"{len(failed)} writable layer(s) failed: {failed[0].error}")


def _bulk_json(bulk: Bulk) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in bulk.results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "from": bulk.source,
        "onto": bulk.target,
        "seconds": round(bulk.seconds, 3),
        "interrupted": bulk.interrupted,
        "counts": counts,
        "layers": [
            {k: v for k, v in r.report_json().items() if k not in ("kept", "applied")}
            for r in sorted(bulk.results, key=lambda r: r.writable)
        ],
    }


def _print_bulk(bulk: Bulk) -> None:
    done = bulk.by_status("rebased") + bulk.by_status("dry-run")
    rate = len(done) / bulk.seconds if bulk.seconds else 0.0
    verb = "rebased" if not bulk.by_status("dry-run") else "merged (dry run)"
    out.print(
        f"{verb} {len(done)} writable layers from {bulk.source} onto {bulk.target} "
        f"in {bulk.seconds:.1f} s ({rate:.1f} layers/s)",
        markup=False,
    )
    conflicts = sum(r.counts.get("conflict", 0) for r in done)
    merged = sum(r.counts.get("merged", 0) for r in done)
    touched = sum(1 for r in done if r.counts.get("conflict"))
    out.print(f"merged {merged} paths; {conflicts} conflicts in {touched} layers", markup=False)
    ordered = sorted(bulk.results, key=lambda r: r.writable)
    already = bulk.by_status("already")
    if already:
        out.print(f"{len(already)} already on {bulk.target}", markup=False)
    others = [r for r in ordered if r.status not in ("rebased", "dry-run", "already")]
    with_conflicts = [r for r in done if r.counts.get("conflict")]
    shown = others + sorted(with_conflicts, key=lambda r: r.writable)[:CONFLICT_ROWS]
    rows = [
        [r.writable, r.status, r.ref or r.source, r.error or _conflict_summary(r)] for r in shown
    ]
    if rows:
        table(["WRITABLE", "STATUS", "VERSION", "DETAIL"], rows)
    if len(with_conflicts) > CONFLICT_ROWS:
        more = len(with_conflicts) - CONFLICT_ROWS
        out.print(f"... and {more} more layers with conflicts (--json lists them all)")


def _conflict_summary(r: Result) -> str:
    from lamina.rebase.report import Action

    paths = ["/" + i.path for i in r.items if i.action is Action.CONFLICT]
    more = f" (+{len(paths) - 3})" if len(paths) > 3 else ""
    return "conflicts: " + ", ".join(paths[:3]) + more


# -- the rule table ---------------------------------------------------------------------------


def _rules_json(rules: Any) -> list[dict[str, str]]:
    return [{"glob": g, "rule": r.value} for g, r in rules]


@policy_app.command("show")
def policy_show(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The rule table, in the order it is matched.

    Example: lamina rebase policy show
    """
    from lamina.manager.services import rebase as svc

    with open_home(home).session() as session:
        rules = svc.get_rules(session).rules
    if as_json:
        emit_json(_rules_json(rules))
        return
    table(["#", "GLOB", "RULE"], [[i + 1, g, r.value] for i, (g, r) in enumerate(rules)])


@policy_app.command("set")
def policy_set(
    glob: Annotated[str, typer.Argument(help="Absolute path pattern: /etc/ssh/**, /srv/*.db")],
    rule: Annotated[str, typer.Argument(help="user | admin | merge")],
    at: Annotated[
        int | None, typer.Option("--at", min=1, help="Position for a new glob (default 1).")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add GLOB (matched first unless --at) or change its rule.

    Example: lamina rebase policy set '/etc/app/*.conf' merge
    """
    from lamina.manager.services import rebase as svc

    with open_home(home).session() as session:
        table_ = svc.get_rules(session).set(glob, rule, at=at - 1 if at else None)
        svc.set_rules(session, table_)
    _done(table_.rules, as_json)


@policy_app.command("rm")
def policy_rm(
    glob: Annotated[str, typer.Argument(help="A glob of the table.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove GLOB from the table.

    Example: lamina rebase policy rm '/etc/app/*.conf'
    """
    from lamina.manager.services import rebase as svc

    with open_home(home).session() as session:
        table_ = svc.get_rules(session).remove(glob)
        svc.set_rules(session, table_)
    _done(table_.rules, as_json)


@policy_app.command("reset")
def policy_reset(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Back to the default table.

    Example: lamina rebase policy reset
    """
    from lamina.manager.services import rebase as svc
    from lamina.rebase.rules import RuleTable

    with open_home(home).session() as session:
        svc.set_rules(session, None)
    _done(RuleTable().rules, as_json)


@policy_app.command("which")
def policy_which(
    path: Annotated[str, typer.Argument(help="An absolute path, e.g. /etc/hosts")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The rule a path gets, and the glob that gives it.

    Example: lamina rebase policy which /etc/hosts
    """
    from lamina.manager.services import rebase as svc

    if not path.startswith("/"):
        raise UsageError(f"{path!r}: give an absolute path")
    with open_home(home).session() as session:
        rule, glob = svc.get_rules(session).rule(path.strip("/"))
    if as_json:
        emit_json({"path": path, "rule": rule.value, "glob": glob or None})
    else:
        out.print(f"{path}: {rule.value} ({glob or 'no glob matches: the fallback'})", markup=False)


def _done(rules: Any, as_json: bool) -> None:
    if as_json:
        emit_json(_rules_json(rules))
    else:
        table(["#", "GLOB", "RULE"], [[i + 1, g, r.value] for i, (g, r) in enumerate(rules)])
