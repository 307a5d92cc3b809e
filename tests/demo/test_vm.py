"""The demo image boots under qemu (TCG) from a local file or NBD, seed as second disk."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lamina.demo.vm import BootReport, boot, boot_async
from lamina.errors import ToolError
from lamina.identity import Identity, new_identity, seed_image, update_identity

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def write_seed(identity: Identity, directory: Path) -> Path:
    path = directory / f"{identity.name}-seed-{identity.identity_rev}.iso"
    path.write_bytes(seed_image(identity))
    return path


@pytest.mark.e2e  # boots a VM under TCG: in make e2e, beside the other VM runs
def test_boots_from_a_local_disk_and_keeps_its_marker(
    disk_copy: Callable[[str], Path], tmp_path: Path
) -> None:
    identity = new_identity("desk-001")
    disk, seed = disk_copy("desk-001"), write_seed(identity, tmp_path)
    first = boot(disk, seed, mac=identity.mac)
    assert (first.hostname, first.machine_id, first.marker) == (
        "desk-001",
        identity.machine_id,
        False,
    )
    assert first.console.count("lamina-boot ") == 1
    second = boot(disk, seed)
    assert (second.hostname, second.machine_id, second.marker) == (
        "desk-001",
        identity.machine_id,
        True,
    )
    # a changed identity reaches the same disk at the next boot
    renamed = update_identity(identity, hostname="desk-101")
    third = boot(disk, write_seed(renamed, tmp_path))
    assert (third.hostname, third.machine_id, third.marker) == (
        "desk-101",
        identity.machine_id,
        True,
    )


@pytest.mark.e2e  # boots a VM under TCG: in make e2e, beside the other VM runs
def test_two_machines_at_once_each_report_their_own_identity(
    disk_copy: Callable[[str], Path], tmp_path: Path
) -> None:
    identities = [new_identity("desk-001"), new_identity("desk-002")]
    jobs = [(disk_copy(i.name), write_seed(i, tmp_path)) for i in identities]

    async def both() -> list[BootReport]:
        return list(await asyncio.gather(*(boot_async(disk, seed) for disk, seed in jobs)))

    started = time.monotonic()
    reports = asyncio.run(both())
    elapsed = time.monotonic() - started
    assert [(r.hostname, r.machine_id, r.marker) for r in reports] == [
        (i.hostname, i.machine_id, False) for i in identities
    ]
    print(f"two VMs at once: {elapsed:.1f} s ({', '.join(f'{r.seconds:.1f}' for r in reports)})")


def qemu_processes(disk: Path) -> list[int]:
    """Live qemu processes using ``disk``, from /proc."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"qemu-system-x86_64") and any(str(disk).encode() in a for a in args):
            pids.append(int(cmdline.parent.name))
    return pids


def test_a_vm_that_overruns_its_timeout_is_killed(
    disk_copy: Callable[[str], Path], tmp_path: Path
) -> None:
    identity = new_identity("desk-001")
    disk, seed = disk_copy("slow"), write_seed(identity, tmp_path)
    with pytest.raises(ToolError, match="did not power off within"):
        boot(disk, seed, timeout=0.5)
    assert qemu_processes(disk) == []
    with pytest.raises(ToolError, match="did not power off within"):
        asyncio.run(boot_async(disk, seed, timeout=0.5))
    assert qemu_processes(disk) == []


@pytest.mark.e2e  # boots a VM under TCG: in make e2e, beside the other VM runs
def test_boots_from_nbd_exports(
    disk_copy: Callable[[str], Path],
    qemu_nbd: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Firmware -> MBR -> extlinux -> kernel over NBD, export names as lamina serves them."""
    identity = new_identity("desk-001")
    disk = qemu_nbd(disk_copy("desk-001"), "machine/desk-001")
    seed = qemu_nbd(write_seed(identity, tmp_path), "machine/desk-001/seed", read_only=True)
    reports = [boot(disk, seed) for _ in range(2)]
    assert [(r.hostname, r.machine_id, r.marker) for r in reports] == [
        ("desk-001", identity.machine_id, False),
        ("desk-001", identity.machine_id, True),
    ]
