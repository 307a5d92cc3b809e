"""A demo-sized boot storm: 16 demo VMs (qemu, TCG) booted at once from one image.

    python bench/demo_storm.py [--vms 16] [--rounds 1]

  lamina    `lamina serve`, each VM's disk is its stateless `machine/NAME` export
  qemu-nbd  the same raw image, each VM on its own qcow2 overlay served by its own
            qemu-nbd

Each VM also gets its machine's NoCloud seed as a local file (the same files for both, so
only the system disk differs). Before each phase the page cache is dropped (as root) and
the server(s) start fresh. Measured: seconds from starting the 16 qemu processes to the
last one's boot line (the VM powers off right after it). Needs root (the demo image is
built with loop mounts) and qemu-system-x86_64.

With ``--rounds N`` the two phases alternate N times (the host's load drifts) and the
ratio is that of the medians.

Prints ``ratio last_boot qemu-nbd/lamina=…`` (higher is better for lamina).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

from common import (
    LAMINA,
    drop_caches,
    free_port,
    need,
    qemu_nbd_overlays,
    run,
    scratch,
    wait_export,
)
from lamina.demo.image import demo_image
from lamina.demo.vm import boot_async
from lamina.errors import ToolError

TRIES = 4


async def one(disk: str, seed: Path, retries: list[str]) -> None:
    """Boot one VM, again if its kernel gave up early: sixteen TCG guests on two busy
    cores sometimes fail the kernel's early timer check (a panic in apic_intr_mode_init)
    before they read a byte of their disk. The retries count in the storm's time."""
    for attempt in range(TRIES):
        try:
            report = await boot_async(disk, seed, timeout=600)
        except ToolError as exc:
            if attempt == TRIES - 1:
                raise
            retries.append(str(exc)[-120:])
            continue
        assert report.hostname
        return


async def storm(disks: list[str], seeds: list[Path]) -> tuple[float, int]:
    """Seconds until the last of the VMs printed its boot line, and how many boots were
    tried again."""
    started = time.monotonic()
    retries: list[str] = []
    await asyncio.gather(*(one(d, s, retries) for d, s in zip(disks, seeds, strict=True)))
    return time.monotonic() - started, len(retries)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=60)


def lamina_phase(
    serve: list[str], env: dict[str, str], port: int, names: list[str], seeds: list[Path]
) -> tuple[float, int]:
    """Every VM on its stateless ``machine/NAME`` export of a fresh ``lamina serve``
    (deltas from the previous round removed: every machine boots clean)."""
    run("rm", "-rf", str(Path(env["LAMINA_HOME"]) / "deltas"))
    drop_caches()
    lamina = subprocess.Popen(serve, env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    try:
        wait_export(f"nbd://127.0.0.1:{port}/demo")
        return asyncio.run(storm([f"nbd://127.0.0.1:{port}/machine/{n}" for n in names], seeds))
    finally:
        stop([lamina])


def qemu_phase(work: Path, raw: Path, seeds: list[Path]) -> tuple[float, int]:
    """Every VM on its own new qcow2 overlay of the raw image, served by its own qemu-nbd."""
    procs, disks = qemu_nbd_overlays(raw, work, len(seeds))
    try:
        for d in disks:
            wait_export(d)
        drop_caches()
        return asyncio.run(storm(disks, seeds))
    finally:
        stop(procs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternating rounds (the ratio of the medians)"
    )
    args = parser.parse_args()
    need("qemu-system-x86_64", "qemu-nbd", "qemu-img", "nbdcopy", "nbdinfo")
    work = scratch("demo-storm")
    raw = demo_image(work / "cache").path
    home = work / "home"
    env = {"LAMINA_HOME": str(home)}
    if not (home / "lamina.db").exists():
        run(LAMINA, "init", env=env)
    run(LAMINA, "image", "import", "demo", str(raw), env=env)
    names = [f"vm{i}" for i in range(args.vms)]
    for name in names:
        run(LAMINA, "machine", "add", name, "--image", "demo", env=env)

    # the seeds, as files, from a first server (then stopped)
    port = free_port()
    serve = [LAMINA, "serve", "--no-http", "--nbd", f"127.0.0.1:{port}"]
    lamina = subprocess.Popen(serve, env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    seeds = [work / f"{name}.seed" for name in names]
    try:
        wait_export(f"nbd://127.0.0.1:{port}/demo")
        for name, seed in zip(names, seeds, strict=True):
            run("nbdcopy", f"nbd://127.0.0.1:{port}/machine/{name}/seed", str(seed))
    finally:
        stop([lamina])

    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(args.rounds):
        took, retries = lamina_phase(serve, env, port, names, seeds)
        ours.append(took)
        print(
            f"lamina    {args.vms} VMs: last boot line after {took:6.1f} s"
            f" ({retries} boots tried again)",
            flush=True,
        )
        took, retries = qemu_phase(work, raw, seeds)
        theirs.append(took)
        print(
            f"qemu-nbd  {args.vms} VMs: last boot line after {took:6.1f} s"
            f" ({retries} boots tried again)",
            flush=True,
        )
    print(
        f"ratio last_boot qemu-nbd/lamina={statistics.median(theirs) / statistics.median(ours):.2f}"
    )
    run("rm", "-rf", str(work))


if __name__ == "__main__":
    main()
