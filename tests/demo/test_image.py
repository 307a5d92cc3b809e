"""The demo disk's layout, as partx, blkid and debugfs read it; caching; the MBR."""

from __future__ import annotations

import struct
import subprocess

import pytest

from lamina.demo.image import DISK_SIZE, MBR_CODE, PART_START, DemoImage, demo_image, mbr
from lamina.demo.initramfs import MARKER, ROOT_LABEL
from lamina.errors import ToolError

from .conftest import cache_root


def run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def test_mbr_has_one_active_linux_partition() -> None:
    sector = mbr(DISK_SIZE, b"\xeb\xfe" * 10)
    assert len(sector) == 512 and sector[510:] == b"\x55\xaa"
    assert sector[:20] == b"\xeb\xfe" * 10
    status, ptype, first, count = struct.unpack_from("<B3xB3xII", sector, 446)
    assert (status, ptype) == (0x80, 0x83)
    assert (first, count) == (PART_START // 512, (DISK_SIZE - PART_START) // 512)
    assert sector[462:510] == bytes(48)  # the other three entries are empty
    with pytest.raises(ToolError, match="440"):
        mbr(DISK_SIZE, bytes(441))


@pytest.mark.peers
def test_demo_image_layout(demo: DemoImage) -> None:
    path = str(demo.path)
    assert demo.size == DISK_SIZE == demo.path.stat().st_size
    assert demo.allocated < 32 << 20  # sparse: kernel, initramfs and metadata only
    assert demo.kernel.startswith("linux-image-") and "cloud-amd64" in demo.kernel
    parts = run("partx", "--raw", "--noheadings", "-o", "NR,START,SECTORS,TYPE,FLAGS", path)
    start, sectors = str(PART_START // 512), str((DISK_SIZE - PART_START) // 512)
    assert parts.split() == ["1", start, sectors, "0x83", "0x80"]  # one active Linux partition
    probe = run("blkid", "-p", "-O", str(PART_START), "-o", "export", path).split()
    assert f"LABEL={ROOT_LABEL}" in probe and "TYPE=ext4" in probe
    fs = f"{path}?offset={PART_START}"
    boot = run("debugfs", "-R", "ls -p /boot", fs)
    names = {line.split("/")[5] for line in boot.splitlines() if line.startswith("/")}
    assert {"vmlinuz", "initrd.img", "extlinux"} <= names
    extlinux = run("debugfs", "-R", "ls -p /boot/extlinux", fs)
    assert "ldlinux.sys" in extlinux and "extlinux.conf" in extlinux
    # boot code: syslinux's MBR, extlinux's boot sector at the start of the partition
    with open(path, "rb") as f:
        code = f.read(440)
        f.seek(PART_START)
        vbr = f.read(512)
    assert code == next(p for p in MBR_CODE if p.exists()).read_bytes()[:440]
    assert vbr[3:11] == b"SYSLINUX" and vbr[510:] == b"\x55\xaa"
    # no machine has written to the cached image
    marker = subprocess.run(
        ["debugfs", "-R", f"stat /{MARKER}", fs], capture_output=True, text=True, check=False
    )
    assert "File not found" in marker.stderr


@pytest.mark.peers
def test_second_call_reuses_the_cache(demo: DemoImage) -> None:
    again = demo_image(cache_root() / "demo")
    assert again.cached and again.path == demo.path
    assert again.build_seconds > 0
