"""lamina image build NAME --debian SUITE, lamina guest install ROOT"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from lamina.cli.common import HomeOpt, JsonOpt, emit_json, err, open_home, out

app = typer.Typer(help="The guest kit: what runs inside a lamina machine.", no_args_is_help=True)


@contextmanager
def _reporter() -> Iterator[tuple[Callable[[str], None], Any]]:
    """Step lines on stderr (with the time since start), and byte progress bars for the
    long steps when stderr is a terminal."""
    started = time.monotonic()

    def say(line: str) -> None:
        err.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim]  {line}", soft_wrap=True)

    if not sys.stderr.isatty():
        yield say, None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        transient=True,
        console=err,
    ) as bars:

        def bar(description: str, total: int) -> Callable[[int], None]:
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield say, bar


def image_build(
    name: Annotated[str, typer.Argument(help="Image name; each build adds NAME@N+1.")],
    debian: Annotated[
        str, typer.Option("--debian", help="Debian release (from this host's apt sources).")
    ] = "bookworm",
    include: Annotated[
        list[str] | None, typer.Option("--include", help="More Debian packages (repeatable).")
    ] = None,
    size: Annotated[str, typer.Option("--size", help="Disk size (4G, 8192M, ...).")] = "4G",
    layer: Annotated[
        bool, typer.Option("--layer/--no-layer", help="Also import the root as layer NAME.")
    ] = True,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Build cache (packages, disks): default HOME/cache/images."),
    ] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Ignore a cached disk.")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a bootable Debian image with the guest kit and import it as NAME@N.

    Example: lamina image build desktop --debian bookworm --include firefox-esr
    """
    from lamina.guest import build, disk

    spec = build.Spec(
        name=name,
        suite=debian,
        include=tuple(include or ()),
        size=disk.parse_size(size),
        layer=layer,
    )
    h = open_home(home)
    with _reporter() as (say, bar):
        built = build.build(h, spec, cache=cache, rebuild=rebuild, log=say, progress=bar)
    if as_json:
        emit_json(build.describe(built))
        return
    how = "cached disk" if built.cached else f"built in {built.seconds:.0f} s"
    out.print(built.image, markup=False)
    if built.layer:
        err.print(f"layer {built.layer} (the same root, to capture apps on); {how}")
    else:
        err.print(how)


@app.command("install")
def install(
    root: Annotated[Path, typer.Argument(help="A root file system (directory).")],
    base: Annotated[
        str | None, typer.Option("--base", help="The layer this root is imported as.")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put the guest kit into ROOT: agent, systemd unit, PAM hook, initramfs identity.

    Example: lamina guest install /mnt/golden-root
    """
    from dataclasses import asdict

    from lamina.guest import kit

    h = open_home(home)
    with _reporter() as (say, _bar):
        done = kit.install(root, base=base, cache=h.cache_dir / "images" / "python", log=say)
    if as_json:
        emit_json(asdict(done))
    else:
        out.print(f"guest kit installed in {done.root} (Python {done.python})", markup=False)
