"""qemu-img, the adapter for every disk format but raw; its failures become lamina errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from lamina.errors import InvalidInput, LaminaError, ToolError

FORMATS = ("raw", "qcow2", "vmdk", "vhdx", "vpc")


def _qemu_img() -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise ToolError("qemu-img is not installed (Debian package qemu-utils; `make install`)")
    return exe


def _run(args: list[str], what: str, error: type[LaminaError]) -> str:
    """Run qemu-img; a failure raises ``error``: what it means depends on what was asked
    (``info`` and ``check`` judge the input, ``convert`` of checked input fails for the
    tool's own reasons: a full disk, an unwritable output)."""
    proc = subprocess.run([_qemu_img(), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        detail = detail.removeprefix("qemu-img: ")
        raise error(f"{what}: {detail}")
    return proc.stdout


# Signatures of the formats qemu-img would otherwise be asked about: offset -> magic.
_MAGIC = {
    "qcow2": (0, b"QFI\xfb"),
    "vmdk": (0, b"KDMV"),
    "vhdx": (0, b"vhdxfile"),
}


def sniff(path: Path) -> str | None:
    """The format from a signature when it is certain, else None (ask qemu-img).

    Saves a qemu-img process for the common raw case: a raw image is claimed only when
    nothing in its first sector or its last 512 bytes (VHD footer) looks like a format.
    """
    with open(path, "rb") as f:
        head = f.read(512)
        size = f.seek(0, 2)
        f.seek(max(0, size - 512))
        tail = f.read(512)
    for fmt, (offset, magic) in _MAGIC.items():
        if head[offset : offset + len(magic)] == magic:
            return fmt
    if head.startswith(b"conectix") or tail.startswith(b"conectix"):
        return "vpc"
    if b"# Disk DescriptorFile" in head or head.startswith((b"COWD", b"QFI")):
        return None  # descriptor-only vmdk, old formats: let qemu-img decide
    return "raw"


def info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    args = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    result: dict[str, Any] = json.loads(_run([*args, str(path)], str(path), InvalidInput))
    return result


def check_self_contained(path: Path, fmt: str) -> None:
    """Refuse images that make qemu-img read other files: a backing file, a qcow2 external
    data file, vmdk extents other than the image itself. An imported image is served to
    every machine, and those references could name any file the importer can read."""
    found = info(path, fmt)
    others: list[str] = []
    if found.get("backing-filename") or found.get("full-backing-filename"):
        others.append(
            f"backing file {found.get('full-backing-filename') or found['backing-filename']}"
        )
    data = (found.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        others.append(f"data file {data['data-file']}")
    me = os.path.realpath(path)
    for extent in data.get("extents") or []:
        name = str(extent.get("filename", ""))
        if os.path.realpath(name) != me:
            others.append(f"extent {name}")
    if others:
        raise InvalidInput(
            f"{path} refers to other files ({', '.join(others)}); import self-contained images "
            f"only (qemu-img convert can make one)"
        )


def check(path: Path, fmt: str) -> None:
    """Structural check of formats that have one (qcow2, vmdk, vhdx)."""
    if fmt in ("qcow2", "vmdk", "vhdx"):
        _run(
            ["check", "-q", "-f", fmt, str(path)],
            f"{path} is not a valid {fmt} image",
            InvalidInput,
        )


def convert(src: Path, dst: Path, *, src_fmt: str, dst_fmt: str) -> None:
    """Convert keeping holes (-S 4k: runs of zeros become holes in the output).

    A failure to open or read ``src`` is the input's fault (InvalidInput: a format with no
    structural check, such as vpc, is first read here); any other (the output cannot be
    created, the disk is full) is the tool's (ToolError)."""
    # vpc would round the size up to a disk geometry: force_size keeps it to the byte.
    opts = {"qcow2": ["-o", "preallocation=off"], "vpc": ["-o", "force_size=on"]}.get(dst_fmt, [])
    args = ["convert", "-q", "-S", "4k", "-f", src_fmt, "-O", dst_fmt, *opts, str(src), str(dst)]
    try:
        _run(args, f"converting {src} from {src_fmt} to {dst_fmt}", ToolError)
    except ToolError as exc:
        if f"Could not open '{src}'" in exc.message or "error while reading" in exc.message:
            raise InvalidInput(exc.message) from None
        raise
