"""Kernel modules for the demo initramfs: dependencies read from the modules themselves.

A kernel package ships no modules.dep (depmod makes it at install time), but each .ko
carries its dependencies in the ``depends=`` field of its ``.modinfo`` ELF section.
"""

from __future__ import annotations

import struct
from pathlib import Path

from lamina.errors import InvalidInput, NotFound

_ELF64_LE = b"\x7fELF\x02\x01"


def sections(data: bytes) -> dict[str, bytes]:
    if not data.startswith(_ELF64_LE):
        raise InvalidInput("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    names = data[str_off : str_off + str_size]
    found = {}
    for i in range(shnum):
        name_off, offset, size = header(i)
        name = names[name_off : names.index(b"\0", name_off)].decode()
        found[name] = data[offset : offset + size]
    return found


def modinfo(data: bytes) -> dict[str, str]:
    """The key=value pairs of a module's .modinfo section (last value wins)."""
    info = {}
    for item in sections(data).get(".modinfo", b"").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info[key] = value
    return info


def module_name(path: Path) -> str:
    """The kernel's name for a module file: its stem, '-' read as '_'."""
    return path.name.removesuffix(".ko").replace("-", "_")


def index(modules_dir: Path) -> dict[str, Path]:
    """Every uncompressed module under ``lib/modules/VERSION`` by name."""
    return {module_name(p): p for p in modules_dir.rglob("*.ko")}


def builtin(modules_dir: Path) -> set[str]:
    path = modules_dir / "modules.builtin"
    if not path.exists():
        return set()
    return {module_name(Path(line)) for line in path.read_text().split()}


def load_order(wanted: list[str], modules_dir: Path) -> list[Path]:
    """The module files to insmod, dependencies first, for ``wanted`` (built-ins skipped)."""
    available, built_in = index(modules_dir), builtin(modules_dir)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in built_in:
            return
        seen.add(name)
        path = available.get(name)
        if path is None:
            raise NotFound(f"kernel module {name} is neither in {modules_dir} nor built in")
        for dep in filter(None, modinfo(path.read_bytes()).get("depends", "").split(",")):
            visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order
