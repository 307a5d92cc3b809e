"""An image version's kernel, initrd and arguments, found in disks laid out as lamina's
images, Debian's and a separate /boot partition are (sfdisk and mkfs.ext4 -d made them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from lamina.demo.image import KERNEL_ARGS, DemoImage
from lamina.errors import NotFound
from lamina.netboot.bootfiles import BootCache, extlinux_args, find_boot_files, grub_args

MiB = 1 << 20
SFDISK = shutil.which("sfdisk") or "/usr/sbin/sfdisk"
Read = Callable[[int, int], bytes]


def partitioned(path: Path, trees: list[Path], part_mib: int = 16) -> tuple[Read, int]:
    """An MBR disk with one ext4 partition per tree, each made from that tree."""
    size = (1 + part_mib * len(trees)) * MiB
    with open(path, "wb") as f:
        f.truncate(size)
    layout = "label: dos\n" + "".join(
        f"start={2048 + i * part_mib * 2048}, size={part_mib * 2048}, type=83\n"
        for i in range(len(trees))
    )
    subprocess.run([SFDISK, "-q", str(path)], input=layout.encode(), check=True)
    for i, tree in enumerate(trees):
        offset = (1 + i * part_mib) * MiB
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-E",
                f"offset={offset}",
                "-d",
                str(tree),
                str(path),
                f"{part_mib * 1024}k",
            ],
            check=True,
            capture_output=True,
        )
    data = path.read_bytes()
    return (lambda offset, length: data[offset : offset + length]), size


def files(root: Path, entries: dict[str, bytes | str]) -> Path:
    """A tree: bytes are files, str are symlink targets."""
    for name, content in entries.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.symlink_to(content)
        else:
            path.write_bytes(content)
    return root


KERNEL_A, INITRD_A = os.urandom(300_000), os.urandom(100_000)
KERNEL_B, INITRD_B = os.urandom(310_000), os.urandom(110_000)
OS_RELEASE = b"ID=debian\n"


def test_lamina_layout_with_extlinux_arguments(tmp_path: Path) -> None:
    tree = files(
        tmp_path / "root",
        {
            "boot/vmlinuz": KERNEL_A,
            "boot/initrd.img": INITRD_A,
            "boot/extlinux/extlinux.conf": b"DEFAULT main\nTIMEOUT 0\nLABEL rescue\n  APPEND single\n"
            b"LABEL main\n  LINUX /boot/vmlinuz\n  APPEND root=LABEL=x console=ttyS0 quiet\n",
            "etc/os-release": OS_RELEASE,
        },
    )
    found = find_boot_files(*partitioned(tmp_path / "disk.img", [tree]))
    assert (found.kernel, found.initrd) == (KERNEL_A, INITRD_A)
    assert found.info.args == "console=ttyS0 quiet"  # root= names a local disk: dropped
    assert (found.info.boot_partition, found.info.root_partition) == (1, 1)


def test_debian_layout_follows_the_top_level_symlinks(tmp_path: Path) -> None:
    tree = files(
        tmp_path / "root",
        {
            "boot/vmlinuz-6.1.0-9-amd64": KERNEL_A,
            "boot/initrd.img-6.1.0-9-amd64": INITRD_A,
            "boot/vmlinuz-6.1.0-10-amd64": KERNEL_B,
            "boot/initrd.img-6.1.0-10-amd64": INITRD_B,
            "vmlinuz": "boot/vmlinuz-6.1.0-9-amd64",  # the admin pinned the older one
            "initrd.img": "boot/initrd.img-6.1.0-9-amd64",
            "boot/grub/grub.cfg": b"menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.1.0-9-amd64"
            b" root=UUID=1234 ro quiet\n\tinitrd /boot/initrd.img-6.1.0-9-amd64\n}\n",
            "etc/os-release": OS_RELEASE,
        },
    )
    found = find_boot_files(*partitioned(tmp_path / "disk.img", [tree]))
    assert (found.kernel, found.initrd) == (KERNEL_A, INITRD_A)
    assert found.info.kernel == "/vmlinuz"
    assert found.info.args == "ro quiet"


def test_newest_versioned_kernel_with_its_initrd(tmp_path: Path) -> None:
    tree = files(
        tmp_path / "root",
        {
            "boot/vmlinuz-6.1.0-9-amd64": KERNEL_A,
            "boot/initrd.img-6.1.0-9-amd64": INITRD_A,
            "boot/vmlinuz-6.1.0-10-amd64": KERNEL_B,
            "boot/initrd.img-6.1.0-10-amd64": INITRD_B,
            "boot/vmlinuz-6.1.0-11-amd64": os.urandom(1000),  # no initrd: not bootable here
        },
    )
    found = find_boot_files(*partitioned(tmp_path / "disk.img", [tree]))
    assert (found.kernel, found.initrd) == (KERNEL_B, INITRD_B)  # 10 sorts after 9
    assert found.info.kernel == "/boot/vmlinuz-6.1.0-10-amd64"


def test_separate_boot_partition_roots_on_the_one_with_os_release(tmp_path: Path) -> None:
    boot = files(tmp_path / "boot", {"vmlinuz-6.1.0-10": KERNEL_B, "initrd.img-6.1.0-10": INITRD_B})
    root = files(tmp_path / "root", {"etc/os-release": OS_RELEASE, "boot/.keep": b""})
    found = find_boot_files(*partitioned(tmp_path / "disk.img", [boot, root]))
    assert (found.kernel, found.initrd) == (KERNEL_B, INITRD_B)
    assert (found.info.boot_partition, found.info.root_partition) == (1, 2)


def test_an_image_without_a_kernel_says_what_was_looked_for(tmp_path: Path) -> None:
    tree = files(tmp_path / "root", {"etc/os-release": OS_RELEASE})
    with pytest.raises(NotFound, match="vmlinuz"):
        find_boot_files(*partitioned(tmp_path / "disk.img", [tree]))
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4 * MiB))
    with pytest.raises(NotFound, match="no ext2/3/4 file system"):
        find_boot_files(lambda o, n: bytes(n), 4 * MiB)


def test_the_cache_reads_the_image_once_per_version(tmp_path: Path) -> None:
    tree = files(tmp_path / "root", {"boot/vmlinuz": KERNEL_A, "boot/initrd.img": INITRD_A})
    read, size = partitioned(tmp_path / "disk.img", [tree])
    calls = []

    def counted(offset: int, length: int) -> bytes:
        calls.append(offset)
        return read(offset, length)

    cache = BootCache(tmp_path / "cache")
    version = "ab" * 32
    assert cache.lookup(version) is None
    folder, info = cache.get(version, counted, size)
    assert cache.lookup(version) == (folder, info)
    assert (folder / "vmlinuz").read_bytes() == KERNEL_A
    assert (folder / "initrd.img").read_bytes() == INITRD_A
    reads = len(calls)
    again, info2 = BootCache(tmp_path / "cache").get(version, counted, size)  # a new process
    assert (again, info2) == (folder, info) and len(calls) == reads
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [version]  # no leftovers


def test_boot_loader_configurations() -> None:
    assert extlinux_args("LABEL a\n APPEND x=1\nLABEL b\n APPEND y=2\n") == "x=1"
    assert extlinux_args("default b\nlabel a\n append x=1\nlabel b\n append y=2\n") == "y=2"
    assert extlinux_args("TIMEOUT 0\n") is None
    assert grub_args("set default=0\n  linux /vmlinuz root=/dev/sda1 ro\n") == "root=/dev/sda1 ro"
    assert grub_args("menuentry {}\n") is None


def test_the_demo_image_matches_debugfs(demo: DemoImage, tmp_path: Path) -> None:
    """The demo disk's kernel as e2fsprogs' own debugfs dumps it."""
    data = demo.path.read_bytes()
    found = find_boot_files(lambda o, n: data[o : o + n], len(data))
    dumped = tmp_path / "vmlinuz"
    subprocess.run(
        ["debugfs", "-R", f"dump /boot/vmlinuz {dumped}", f"{demo.path}?offset={MiB}"],
        check=True,
        capture_output=True,
    )
    assert found.kernel == dumped.read_bytes()
    assert found.info.args == KERNEL_ARGS  # extlinux's APPEND
    assert found.info.root_partition == 1
