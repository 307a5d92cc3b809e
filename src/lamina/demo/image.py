"""The bootable demo disk, built from Debian packages only and cached: built once per home.

Layout (raw, sparse, 64 MiB): an MBR with syslinux's boot code and one active Linux
partition from 1 MiB, an ext4 file system holding /boot/vmlinuz, /boot/initrd.img and
extlinux. Firmware (SeaBIOS) -> MBR -> extlinux -> kernel + initramfs, nothing else:
the disk boots the same from a local file or from an NBD export.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.demo import tools
from lamina.demo.initramfs import MODULES, ROOT_LABEL, build_initramfs
from lamina.demo.kmod import load_order
from lamina.demo.userland import CLIENT_PACKAGE, closure
from lamina.errors import ToolError

if TYPE_CHECKING:
    from lamina.home import Home

# Bump when what goes into the image changes: older cached images are then rebuilt.
# 2: a script disk (lmscript) the init sources. 3: nbd-client, its libraries, virtio_net
# and nbd in the initramfs (network boot). 4: no_timer_check. 5: all of these together.
RECIPE = 5
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
MiB = 1 << 20
DISK_SIZE = 64 * MiB  # kernel 14 MiB + initramfs ~5 MiB, with room for machines' writes
PART_START = 1 * MiB  # the usual alignment; the gap holds nothing (extlinux lives in the VBR)
SECTOR = 512
MBR_CODE = (Path("/usr/lib/EXTLINUX/mbr.bin"), Path("/usr/lib/syslinux/mbr/mbr.bin"))
# console on the first serial port; quiet keeps the kernel's log to warnings; panic=-1
# reboots at once on a panic, which -no-reboot turns into qemu exiting. no_timer_check:
# TCG guests on a loaded host failed the kernel's IO-APIC timer check and panicked
# before reading their disk (apic_intr_mode_init; 2 boots in 9 of one benchmark run).
KERNEL_ARGS = "console=ttyS0 quiet panic=-1 no_timer_check"

EXTLINUX_CONF = f"""DEFAULT lamina
PROMPT 0
TIMEOUT 0
LABEL lamina
  LINUX /boot/vmlinuz
  INITRD /boot/initrd.img
  APPEND {KERNEL_ARGS}
"""

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoImage:
    path: Path
    kernel: str  # the kernel package, e.g. linux-image-6.1.0-56-cloud-amd64 6.1.192-2
    busybox: str
    size: int  # bytes, the disk's virtual size
    allocated: int  # bytes actually stored (the file is sparse)
    build_seconds: float
    cached: bool  # True when it came from the cache, not from this call
    nbd_client: str = ""  # the nbd-client package in the initramfs, for network boots


def mbr(disk_size: int, boot_code: bytes, signature: int = 0x4C414D49) -> bytes:
    """A 512-byte MBR: boot code, disk signature, one active type-0x83 partition."""
    if len(boot_code) > 440:
        raise ToolError(f"MBR boot code is {len(boot_code)} bytes, more than 440")
    first = PART_START // SECTOR
    count = (disk_size - PART_START) // SECTOR
    # CHS fields at their "use LBA" maximum: SeaBIOS and mbr.bin address by LBA.
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", first, count)
    return (
        boot_code.ljust(440, b"\0")
        + struct.pack("<IH", signature, 0)
        + entry.ljust(64, b"\0")
        + b"\x55\xaa"
    )


def boot_code() -> bytes:
    for path in MBR_CODE:
        if path.exists():
            return path.read_bytes()[:440]
    raise ToolError("syslinux's mbr.bin is missing (Debian package syslinux-common)")


@contextlib.contextmanager
def loop_mount(
    disk: Path, offset: int, size: int, mountpoint: Path, *, read_only: bool = False
) -> Iterator[Path]:
    """Mount the partition through a loop device; always unmounted and detached."""
    device = tools.run(
        [
            "losetup",
            "--find",
            "--show",
            "--offset",
            str(offset),
            "--sizelimit",
            str(size),
            *(["--read-only"] if read_only else []),
            str(disk),
        ],
        "attaching a loop device",
    ).strip()
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
        options = ["-o", "ro,noload"] if read_only else []
        tools.run(["mount", "-t", "ext4", *options, device, str(mountpoint)], f"mounting {device}")
        try:
            yield mountpoint
        finally:
            tools.run(["umount", str(mountpoint)], f"unmounting {mountpoint}")
    finally:
        tools.run(["losetup", "--detach", device], f"detaching {device}")


def _root_tree(root: Path, kernel_dir: Path, busybox: bytes, userland: dict[str, bytes]) -> None:
    """The root file system's files: kernel, initramfs, extlinux.conf, an empty marker dir."""
    (modules_root,) = (kernel_dir / "lib" / "modules").iterdir()
    (vmlinuz,) = (kernel_dir / "boot").glob("vmlinuz-*")
    boot = root / "boot"
    (boot / "extlinux").mkdir(parents=True)
    shutil.copyfile(vmlinuz, boot / "vmlinuz")
    initrd = build_initramfs(busybox, load_order(list(MODULES), modules_root), userland)
    (boot / "initrd.img").write_bytes(initrd)
    (boot / "extlinux" / "extlinux.conf").write_text(EXTLINUX_CONF)
    (root / "var" / "lib" / "lamina-demo").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text('NAME="lamina demo"\nID=lamina-demo\n')


def _make_disk(disk: Path, root: Path, work: Path) -> None:
    part_size = DISK_SIZE - PART_START
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
        f.write(mbr(DISK_SIZE, boot_code()))
    # 4 KiB blocks (not the 1 KiB mke2fs picks for small file systems): fewer block
    # reads for extlinux and the kernel.
    tools.run(
        [
            "mkfs.ext4", "-q", "-F", "-b", "4096", "-L", ROOT_LABEL, "-d", str(root),
            "-E", f"offset={PART_START}", str(disk), f"{part_size // 1024}k",
        ],
        "making the root file system",
    )  # fmt: skip
    with loop_mount(disk, PART_START, part_size, work / "mnt") as mnt:
        tools.run(["extlinux", "--install", str(mnt / "boot" / "extlinux")], "installing extlinux")


def _build(dest: Path, work: Path, log: Log) -> tuple[str, str, str]:
    log(f"resolving {KERNEL_META} and {CLIENT_PACKAGE}")
    kernel_pkg = tools.kernel_package(KERNEL_META)
    client_pkgs = tools.library_packages(CLIENT_PACKAGE)
    log(f"downloading {kernel_pkg}, {BUSYBOX}, {CLIENT_PACKAGE} and its libraries")
    debs_dir = work / "debs"
    debs_dir.mkdir()
    kernel_deb, busybox_deb, *client_debs = tools.download(
        [kernel_pkg, BUSYBOX, *client_pkgs], debs_dir
    )
    log("extracting packages, building the initramfs")
    kernel_dir = tools.extract(kernel_deb, work / "kernel")
    busybox = (tools.extract(busybox_deb, work / "busybox") / "bin" / "busybox").read_bytes()
    for deb in client_debs:
        tools.extract(deb, work / "client")
    root = work / "root"
    _root_tree(root, kernel_dir, busybox, closure(work / "client"))
    log("making the disk: MBR, ext4, extlinux")
    _make_disk(dest, root, work)
    return (
        f"{kernel_pkg} {tools.deb_version(kernel_deb)}",
        tools.deb_version(busybox_deb),
        f"{CLIENT_PACKAGE} {tools.deb_version(client_debs[0])}",
    )


def _paths(cache_dir: Path) -> tuple[Path, Path]:
    stem = cache_dir / f"lamina-demo-r{RECIPE}"
    return stem.with_suffix(".img"), stem.with_suffix(".json")


def _load(cache_dir: Path) -> DemoImage | None:
    image, meta = _paths(cache_dir)
    if not (image.exists() and meta.exists()):
        return None
    data = json.loads(meta.read_text())
    data |= {"path": image, "cached": True, "allocated": image.stat().st_blocks * 512}
    return DemoImage(**data)


def demo_image(cache_dir: Path, *, rebuild: bool = False, log: Log | None = None) -> DemoImage:
    """The demo disk image under ``cache_dir``, built on first use (10-30 s and 33 MB
    downloaded) and reused after. Safe to call from several processes at once: one
    builds, the others wait for it and reuse its image.
    """
    say = log or (lambda _msg: None)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = None if rebuild else _load(cache_dir)
        if cached is not None:
            return cached
        image, meta = _paths(cache_dir)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="build-", dir=cache_dir) as tmp:
            work = Path(tmp)
            partial = work / "disk.img"
            kernel, busybox, client = _build(partial, work, say)
            os.replace(partial, image)
        built = DemoImage(
            path=image,
            kernel=kernel,
            busybox=busybox,
            size=DISK_SIZE,
            allocated=image.stat().st_blocks * 512,
            build_seconds=round(time.monotonic() - started, 2),
            cached=False,
            nbd_client=client,
        )
        record = {
            k: v for k, v in asdict(built).items() if k not in ("path", "cached", "allocated")
        }
        meta.write_text(json.dumps(record, indent=2) + "\n")
        say(f"built {image} in {built.build_seconds:.1f} s")
        return built


def home_demo_image(home: Home, *, rebuild: bool = False, log: Log | None = None) -> DemoImage:
    """The demo image cached in a lamina home (``HOME/cache/demo``)."""
    return demo_image(home.cache_dir / "demo", rebuild=rebuild, log=log)
