"""The initramfs: a cpio the real cpio reads, modules in dependency order."""

from __future__ import annotations

import gzip
import struct
import subprocess
from pathlib import Path

import pytest

from lamina.demo.initramfs import BOOT_PREFIX, INIT, build_initramfs
from lamina.demo.kmod import load_order, modinfo
from lamina.errors import NotFound
from lamina.netboot import cpio


def fake_module(path: Path, depends: str) -> Path:
    """A minimal ELF64 relocatable file with just a .modinfo section, as modules carry."""
    info = f"license=GPL\0depends={depends}\0name={path.stem}\0".encode()
    strtab = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    str_off = data_off + len(info)
    sh_off = (str_off + len(strtab) + 7) & ~7
    header = b"\x7fELF\x02\x01\x01" + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 2)

    def section(name: int, kind: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, offset, size, 0, 0, 1, 0)

    sections = bytes(64) + section(1, 1, data_off, len(info)) + section(10, 3, str_off, len(strtab))
    body = header + info + strtab
    path.write_bytes(body + bytes(sh_off - len(body)) + sections)
    return path


@pytest.fixture
def modules(tmp_path: Path) -> Path:
    root = tmp_path / "lib" / "modules" / "6.1.0-test"
    (root / "kernel").mkdir(parents=True)
    fake_module(root / "kernel" / "virtio_ring.ko", "")
    fake_module(root / "kernel" / "virtio.ko", "")
    fake_module(root / "kernel" / "virtio_blk.ko", "virtio,virtio_ring")
    fake_module(root / "kernel" / "cdrom.ko", "")
    fake_module(root / "kernel" / "isofs.ko", "cdrom,crc-t10dif")
    fake_module(root / "kernel" / "crc-t10dif.ko", "")
    (root / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/lib/crc-t10dif.ko\n")
    return root


def test_modinfo_reads_the_elf_section(modules: Path) -> None:
    info = modinfo((modules / "kernel" / "virtio_blk.ko").read_bytes())
    assert info["depends"] == "virtio,virtio_ring" and info["license"] == "GPL"


def test_load_order_puts_dependencies_first_and_skips_builtins(modules: Path) -> None:
    order = [p.stem for p in load_order(["virtio_blk", "ext4", "isofs"], modules)]
    assert order == ["virtio", "virtio_ring", "virtio_blk", "cdrom", "isofs"]
    with pytest.raises(NotFound, match="nbd"):
        load_order(["nbd"], modules)


def test_cpio_is_read_by_a_real_cpio(tmp_path: Path) -> None:
    archive = cpio.archive(
        [
            cpio.directory("dev"),
            cpio.char_device("dev/console", 5, 1),
            cpio.file("init", b"#!/bin/sh\n", 0o755),
            cpio.symlink("sh", "busybox"),
            cpio.file("odd", b"x" * 5),
        ]
    )
    listing = subprocess.run(
        ["busybox", "cpio", "-tv"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    lines = [line.split() for line in listing.splitlines()]
    assert [line[0] for line in lines] == [
        "drwxr-xr-x",
        "crw-------",
        "-rwxr-xr-x",
        "lrwxrwxrwx",
        "-rw-r--r--",
    ]
    assert [line[5] for line in lines] == ["dev", "dev/console", "init", "sh", "odd"]
    assert lines[3][-1] == "busybox"  # sh -> busybox
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["busybox", "cpio", "-id", "odd"], input=archive, cwd=out, check=True, capture_output=True
    )
    assert (out / "odd").read_bytes() == b"xxxxx"


def test_initramfs_holds_init_busybox_and_modules(modules: Path) -> None:
    image = build_initramfs(b"\x7fELF busybox", load_order(["virtio_blk"], modules))
    assert image == build_initramfs(b"\x7fELF busybox", load_order(["virtio_blk"], modules))
    listing = subprocess.run(
        ["busybox", "cpio", "-t"], input=gzip.decompress(image), capture_output=True, check=True
    ).stdout.decode()
    names = listing.split()
    assert {"init", "bin/busybox", "bin/sh", "dev/console", "lib/modules/load-order"} <= set(names)
    assert "lib/modules/virtio_blk.ko" in names
    assert f'echo "{BOOT_PREFIX}hostname=' in INIT and "poweroff -f" in INIT


def test_userland_closure_matches_ldd(tmp_path: Path) -> None:
    """The libraries found by following DT_NEEDED are the ones ld.so would load (ldd)."""
    from lamina.demo.userland import CLIENT_PATH, closure, interpreter

    program = Path("/usr/bin/curl")  # a program with a deep library tree (TLS, HTTP/2, ...)
    listed = subprocess.run(
        ["ldd", str(program)], capture_output=True, text=True, check=True
    ).stdout
    expected = {line.split()[0] for line in listed.splitlines() if "=>" in line}
    root = tmp_path / "root"
    (root / "sbin").mkdir(parents=True)
    (root / CLIENT_PATH).write_bytes(program.read_bytes())
    libs = root / "lib" / "x86_64-linux-gnu"
    libs.mkdir(parents=True)
    for line in listed.splitlines():
        if "=>" in line:
            name, _, path = line.split()[:3]
            (libs / name).symlink_to(path)
    loader = interpreter(program.read_bytes())
    (libs / Path(loader).name).symlink_to(loader)
    files = closure(root)
    assert {Path(p).name for p in files if p.startswith("lib/x86_64-linux-gnu/")} == expected
    assert files[loader.lstrip("/")] == Path(loader).read_bytes()
    assert files[CLIENT_PATH] == program.read_bytes()
