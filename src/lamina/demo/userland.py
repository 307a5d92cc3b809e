"""Debian's nbd-client for the demo initramfs, with the shared libraries it loads.

A network-booted demo machine roots itself on NBD with the guest kernel's ``nbd`` driver
and Debian's ``nbd-client`` (the same client Debian's own initramfs-tools hook uses).
The client is dynamically linked, so the initramfs carries the libraries it needs, found
by following each ELF file's ``DT_NEEDED`` entries (tag 1 in the ``.dynamic`` section,
names in ``.dynstr``) through the packages' files, and the dynamic loader named by its
``.interp`` section.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from lamina.demo.kmod import sections
from lamina.errors import ToolError

CLIENT_PACKAGE = "nbd-client"
CLIENT_PATH = "sbin/nbd-client"
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib")
_DT_NEEDED = 1


@dataclass(frozen=True)
class Userland:
    """An executable and what the loader needs to run it: path in the initramfs -> bytes."""

    files: dict[str, bytes]
    package_versions: str  # "nbd-client 1:3.24-1.1", for the image's record


def needed(elf: bytes) -> list[str]:
    """The sonames an ELF file asks the loader for."""
    found = sections(elf)
    dynamic, strings = found.get(".dynamic", b""), found.get(".dynstr", b"")
    names = []
    for at in range(0, len(dynamic) - 15, 16):
        tag, value = struct.unpack_from("<qQ", dynamic, at)
        if tag == 0:
            break
        if tag == _DT_NEEDED:
            names.append(strings[value : strings.index(b"\0", value)].decode())
    return names


def interpreter(elf: bytes) -> str:
    """The dynamic loader's path (``/lib64/ld-linux-x86-64.so.2``)."""
    interp = sections(elf).get(".interp")
    if not interp:
        raise ToolError("nbd-client has no .interp section: not a dynamic executable")
    return interp.rstrip(b"\0").decode()


def _find(root: Path, name: str) -> Path:
    for folder in LIB_DIRS:
        path = root / folder / name
        if path.exists():
            return path.resolve()
    raise ToolError(f"{name}, which nbd-client needs, is in none of the packages extracted")


def closure(root: Path) -> dict[str, bytes]:
    """nbd-client and every library it loads, from a tree the packages were extracted
    into; keyed by where they go in the initramfs."""
    client = (root / CLIENT_PATH).read_bytes()
    loader = interpreter(client)
    libs: dict[str, bytes] = {}
    todo = needed(client)
    while todo:
        name = todo.pop()
        if name in libs or name == Path(loader).name:  # libc names the loader: it goes apart
            continue
        libs[name] = _find(root, name).read_bytes()
        todo += needed(libs[name])
    files = {CLIENT_PATH: client, loader.lstrip("/"): _find(root, Path(loader).name).read_bytes()}
    files |= {f"lib/x86_64-linux-gnu/{name}": data for name, data in sorted(libs.items())}
    return files
