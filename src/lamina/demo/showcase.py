"""``lamina demo``: the whole shared-image story on embedded defaults.

Builds (or reuses) the demo disk, imports it, adds desk-001 (stateless) and desk-002
(stateful), serves them, boots both VMs at once from NBD with their identity seeds; both
power off, the server restarts (which changes no disk), both boot again, and desk-001
comes back pristine (a new boot of a stateless machine) while desk-002 kept its marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina.delta.file import delta_usage, discard
from lamina.demo.image import home_demo_image
from lamina.demo.vm import BootReport, boot_async
from lamina.errors import LaminaError
from lamina.home import Home
from lamina.image import Imported
from lamina.image.importer import import_and_commit
from lamina.manager.services import images, machines
from lamina.serve.options import ServeOptions
from lamina.serve.server import serve

MACHINES = (("desk-001", "stateless"), ("desk-002", "stateful"))
IMAGE = "demo"

Say = Callable[[str], None]


@dataclass
class DemoResult:
    image: str = ""
    nbd: str = ""
    http: str = ""
    boots: list[dict[str, Any]] = field(default_factory=list)
    deltas: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    pxe: bool = False
    newcomers: list[str] = field(default_factory=list)  # machines added at their first boot


def free_port(preferred: int, avoid: int | None = None) -> int:
    """``preferred`` when it is free on loopback, else a free port below the kernel's
    ephemeral range: the demo listens on it twice (the server restarts), and a port
    from the ephemeral range may meanwhile become some outgoing connection's source
    port (seen under a loaded test run), which would refuse the second listen. ``avoid``:
    a port picked before and not listened on yet (the NBD one, when picking HTTP's)."""
    low = _ephemeral_start()
    below = list(range(max(1024, low - 12000), low))
    # in random order: demos and test runs started at once on one host each took the
    # lowest free port, the same one, and all but one failed to listen on it
    random.shuffle(below)
    candidates = ([preferred] if preferred else []) + below
    for port in candidates:
        if port == avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise LaminaError("no free port on 127.0.0.1 for the demo")


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _image_ref(home: Home, say: Say) -> str:
    """The demo image's latest version, importing the demo disk on first use."""
    built = home_demo_image(home, log=say)
    state = "cached" if built.cached else f"built in {built.build_seconds:.1f} s"
    say(f"demo disk {built.path} ({built.size >> 20} MiB, {state})")
    with home.session() as session:
        versions = {i.name: i.versions for i in images.list_images(session)}.get(IMAGE)
        # a version imported from an older build of the demo disk is not reused: its
        # initramfs may lack what this one does (network boot)
        if versions and versions[-1].source == str(built.path):
            say(f"reusing {versions[-1].ref}")
            return versions[-1].ref

    def commit(imported: Imported) -> str:
        with home.session() as session:
            return images.add_version(
                session, name=IMAGE, imported=imported, source=str(built.path)
            ).ref

    ref, _ = import_and_commit(home.store, built.path, commit, fmt="raw")
    say(f"imported {ref}")
    return ref


def prepare(home: Home, say: Say) -> str:
    """Demo image imported, demo machines (re)created; returns the image version."""
    ref = _image_ref(home, say)
    with home.session(read_only=True) as session:
        present = {m.name for m in machines.list_all(session)}
    for name, _mode in MACHINES:
        discard(home.deltas_dir / name)
        if name in present:  # a new identity and an empty delta each run
            machines.remove(home, name=name, force=True)
    with home.session() as session:
        for name, mode in MACHINES:
            machines.add(session, name=name, image=ref, mode=mode)
    say("machines " + ", ".join(f"{n} ({m})" for n, m in MACHINES))
    return ref


@contextlib.asynccontextmanager
async def serving(home: Home, options: ServeOptions) -> AsyncIterator[None]:
    """``lamina serve`` in this process for the body of the ``async with``."""
    started = asyncio.Event()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(home, options, ready=started.set, stop=stop))
    await asyncio.wait(
        [task, asyncio.create_task(started.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    if task.done():
        task.result()  # the server failed to start: raise its error
    try:
        yield
    finally:
        stop.set()
        await task


def record(
    result: DemoResult, label: str, name: str, mode: str, report: BootReport, say: Say
) -> None:
    say(f"  {name:9s} {report.line}  ({report.seconds:.1f} s)")
    result.boots.append(
        {
            "round": label,
            "machine": name,
            "mode": mode,
            "hostname": report.hostname,
            "machine_id": report.machine_id,
            "marker": report.marker,
            "seconds": round(report.seconds, 2),
            "line": report.line,
        }
    )


async def _round(
    home: Home,
    nbd: tuple[str, int],
    http: tuple[str, int] | None,
    label: str,
    say: Say,
    result: DemoResult,
) -> None:
    options = ServeOptions(nbd=nbd, http=http, log_level="warning")
    base = f"nbd://{nbd[0]}:{nbd[1]}/machine"
    async with serving(home, options):
        say(f"{label}: booting {', '.join(n for n, _ in MACHINES)} from {base}/...")
        reports: list[BootReport] = await asyncio.gather(
            *(boot_async(f"{base}/{n}", f"{base}/{n}/seed") for n, _ in MACHINES)
        )
    for (name, mode), report in zip(MACHINES, reports, strict=True):
        record(result, label, name, mode, report, say)


def between_rounds(say: Say) -> None:
    say(
        "both powered off; restarting the server (no disk changes): the stateless machine's "
        "next boot starts clean, the stateful one keeps its disk"
    )


def run_demo(home: Home, say: Say, *, nbd_port: int = 10809, http_port: int = 8480) -> DemoResult:
    started = time.monotonic()
    result = DemoResult(image=prepare(home, say))
    nbd = ("127.0.0.1", free_port(nbd_port))
    http = ("127.0.0.1", free_port(http_port, avoid=nbd[1]))
    result.nbd, result.http = f"nbd://{nbd[0]}:{nbd[1]}", f"http://{http[0]}:{http[1]}"
    say(f"serving {result.nbd} and {result.http}")
    asyncio.run(_round(home, nbd, http, "boot 1", say, result))
    between_rounds(say)
    asyncio.run(_round(home, nbd, http, "boot 2", say, result))
    return finish(home, result, started, say)


def finish(home: Home, result: DemoResult, started: float, say: Say) -> DemoResult:
    for name in [n for n, _ in MACHINES] + result.newcomers:
        result.deltas[name] = delta_usage(home.deltas_dir / name)[0] * 4096
    say("deltas: " + ", ".join(f"{n} {b >> 10} KiB" for n, b in result.deltas.items()))
    result.seconds = round(time.monotonic() - started, 1)
    return result
