"""``lamina demo --pxe``: the demo's story with machines that have no disk at all.

The same image and machines as ``lamina demo``, but qemu attaches no disk: each VM
boots from its network card (qemu's iPXE ROM and user networking), asks lamina's
``/boot.ipxe`` who it is by MAC, and gets its pinned version's kernel and initrd, whose
init roots the machine on ``machine/NAME`` over NBD. A third VM with a MAC the database
does not know shows why it cannot boot on its screen and is listed as a new device; the
demo then adds it, as an administrator would, and it boots at its next try.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from lamina.delta.file import discard
from lamina.demo.pxe import HOST_FROM_GUEST, PxeVm
from lamina.demo.showcase import (
    MACHINES,
    DemoResult,
    Say,
    between_rounds,
    finish,
    free_port,
    prepare,
    record,
    serving,
)
from lamina.demo.vm import BootReport
from lamina.home import Home
from lamina.identity.validate import generate_mac
from lamina.manager.services import machines, netboot
from lamina.serve.options import ServeOptions

NEWCOMER = "desk-003"
UNKNOWN = "is not known to the manager"
RETRY_SECONDS = 3  # a newcomer asks again this soon (lamina serve's default: 10 s)


def _boot(name: str, mac: str, workdir: Path, http_base: str) -> BootReport:
    with PxeVm(name, mac, workdir, http_base) as vm:
        return vm.wait()


def _newcomer(
    home: Home, mac: str, ref: str, workdir: Path, http_base: str, say: Say
) -> BootReport:
    """A MAC nobody added: its screen says so, it is listed, it is added, it boots."""
    with PxeVm("newcomer", mac, workdir, http_base) as vm:
        seconds = vm.wait_for(UNKNOWN)
        say(f"  newcomer  {mac}: '{UNKNOWN}' on its screen ({seconds:.1f} s)")
        with home.session(read_only=True) as session:
            listed = [d.mac for d in netboot.new_devices(session)]
        if mac not in listed:
            raise AssertionError(f"{mac} asked to boot but is not listed as a new device")
        say(f"  newcomer  listed as a new device (lamina machine list --new): {mac}")
        with home.session() as session:
            machines.add(session, name=NEWCOMER, image=ref, mode="stateful", mac=mac)
        say(f"  newcomer  added: lamina machine add {NEWCOMER} --image {ref} --mac {mac}")
        return vm.wait()


def _macs(home: Home) -> dict[str, str]:
    with home.session(read_only=True) as session:
        return {m.name: m.mac for m in machines.list_all(session)}


async def _round(
    home: Home,
    options: ServeOptions,
    label: str,
    say: Say,
    result: DemoResult,
    workdir: Path,
    newcomer: tuple[str, str] | None = None,
) -> None:
    assert options.http is not None
    http_base = f"http://{HOST_FROM_GUEST}:{options.http[1]}"
    macs = _macs(home)
    async with serving(home, options):
        say(
            f"{label}: powering on {', '.join(n for n, _ in MACHINES)} with no disk ({http_base}/boot.ipxe)"
        )
        jobs = [
            asyncio.to_thread(_boot, name, macs[name], workdir / label, http_base)
            for name, _ in MACHINES
        ]
        if newcomer is not None:
            mac, ref = newcomer
            say(f"{label}: and a newcomer, {mac}, that no machine has")
            jobs.append(
                asyncio.to_thread(_newcomer, home, mac, ref, workdir / label, http_base, say)
            )
        reports: list[BootReport] = await asyncio.gather(*jobs)
    for (name, mode), report in zip(MACHINES, reports, strict=False):
        record(result, label, name, mode, report, say)
    if newcomer is not None:
        record(result, label, NEWCOMER, "stateful", reports[-1], say)


def _forget_newcomer(home: Home) -> None:
    with home.session(read_only=True) as session:
        present = any(m.name == NEWCOMER for m in machines.list_all(session))
    if present:
        machines.remove(home, name=NEWCOMER, force=True)
    discard(home.deltas_dir / NEWCOMER)


def run_pxe_demo(
    home: Home, say: Say, *, nbd_port: int = 10809, http_port: int = 8480
) -> DemoResult:
    started = time.monotonic()
    _forget_newcomer(home)
    ref = prepare(home, say)
    result = DemoResult(image=ref, pxe=True, newcomers=[NEWCOMER])
    nbd = ("127.0.0.1", free_port(nbd_port))
    http = ("127.0.0.1", free_port(http_port, avoid=nbd[1]))
    result.nbd, result.http = f"nbd://{nbd[0]}:{nbd[1]}", f"http://{http[0]}:{http[1]}"
    say(f"serving {result.nbd} and {result.http}; the VMs reach them at {HOST_FROM_GUEST}")
    options = ServeOptions(
        nbd=nbd, http=http, log_level="warning", boot_retry_seconds=RETRY_SECONDS
    )
    with tempfile.TemporaryDirectory(prefix="pxe-", dir=home.tmp_dir) as tmp:
        workdir = Path(tmp)
        newcomer = (generate_mac(), ref)
        asyncio.run(_round(home, options, "boot 1", say, result, workdir, newcomer))
        between_rounds(say)
        asyncio.run(_round(home, options, "boot 2", say, result, workdir))
    return finish(home, result, started, say)
