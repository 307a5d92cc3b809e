"""A bootable raw disk from a root directory: what ``lamina image build`` imports.

Layout (the demo image's, at full size): an MBR with syslinux's boot code and one active
Linux partition from 1 MiB to the end, ext4 labelled ``lamina-root`` with a UUID fixed by
the build's inputs (same inputs, same file system identity), extlinux in ``/boot``.
Firmware -> MBR -> extlinux -> ``/vmlinuz`` + ``/initrd.img`` (Debian keeps these links
on the newest kernel) -> the initramfs mounts ``root=UUID=...``. The disk boots the same
from a file, an NBD export (qemu) or a network block device in the guest's initramfs.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from lamina.demo import tools
from lamina.demo.image import PART_START, boot_code, loop_mount, mbr
from lamina.errors import UsageError

Log = Callable[[str], None]
GiB = 1 << 30
LABEL = "lamina-root"
# Serial console (qemu's -serial), quiet boot; net.ifnames=0 keeps the NIC eth0 whatever
# slot it sits in; rootfstype spares the initramfs a probe. panic=30 reboots a machine
# that cannot find its root rather than leaving it hung.
KERNEL_ARGS = "ro console=ttyS0,115200n8 quiet net.ifnames=0 rootfstype=ext4 panic=30"
EXTLINUX = """DEFAULT lamina
PROMPT 0
TIMEOUT 0
LABEL lamina
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND root=UUID={uuid} {args}
"""
_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``4G``, ``4096M``, ``4GiB`` or bytes."""
    found = _SIZE.fullmatch(text.strip())
    if found is None:
        raise UsageError(f"bad size {text!r}: expected a number with K, M, G or T (e.g. 4G)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[found[2].upper()]
    return int(found[1]) << shift


def fs_uuid(key: str) -> str:
    """A file system UUID from the build's key (a v4-shaped UUID, reproducible)."""
    return str(uuid.UUID(bytes=bytes.fromhex(key[:32]), version=4))


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


def prepare_root(root: Path, uuid_text: str) -> None:
    """Boot configuration in the root: extlinux.conf, fstab; /dev emptied (the kernel's
    devtmpfs covers it at boot, and a layer made from the root carries no device nodes)."""
    conf = root / "boot" / "extlinux" / "extlinux.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(EXTLINUX.format(uuid=uuid_text, args=KERNEL_ARGS))
    (root / "etc" / "fstab").write_text(
        f"# lamina image: the root, by the UUID the kernel command line names\n"
        f"UUID={uuid_text} / ext4 errors=remount-ro 0 1\n"
    )
    dev = root / "dev"
    for child in dev.iterdir() if dev.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def make(disk: Path, root: Path, size: int, key: str, log: Log) -> str:
    """Write the bootable disk of ``root`` to ``disk``; returns the file system UUID."""
    need = tree_bytes(root)
    # ext4's own metadata, and room for a machine's writes: a quarter more at least.
    if size < need * 5 // 4 + 256 * (1 << 20):
        want = (need * 5 // 4 + 256 * (1 << 20) + GiB - 1) // GiB
        raise UsageError(f"the root takes {need / GiB:.1f} GiB: --size must be {want}G or more")
    uuid_text = fs_uuid(key)
    prepare_root(root, uuid_text)
    part_size = size - PART_START
    with open(disk, "wb") as f:
        f.truncate(size)
        f.write(mbr(size, boot_code()))
    log(f"making the ext4 file system ({need / GiB:.2f} GiB of files on {size / GiB:.1f} GiB)")
    tools.run(
        [
            "mkfs.ext4", "-q", "-F", "-b", "4096", "-L", LABEL, "-U", uuid_text,
            "-E", f"offset={PART_START},root_owner=0:0", "-d", str(root),
            str(disk), f"{part_size // 1024}k",
        ],
        "making the root file system",
    )  # fmt: skip
    log("installing extlinux")
    with loop_mount(disk, PART_START, part_size, disk.parent / "mnt") as mnt:
        tools.run(["extlinux", "--install", str(mnt / "boot" / "extlinux")], "installing extlinux")
    return uuid_text
