"""The kernel, initrd and kernel arguments of an image version, read from its own file
system and kept per version, so patching the image patches what machines boot.

Where they are looked for, in each ext2/3/4 partition in table order:

1. ``/boot/vmlinuz`` and ``/boot/initrd.img``, then ``/vmlinuz`` and ``/initrd.img``
   (Debian's symlinks, followed inside the image; lamina's images have the first);
2. else the newest ``vmlinuz-VERSION`` in ``/boot`` (or at the top of a separate boot
   partition) that has an ``initrd.img-VERSION`` beside it.

The kernel arguments are the image's own: the ``APPEND`` line of extlinux's default
label (``/boot/extlinux/extlinux.conf``), else the first ``linux`` line of GRUB's
``/boot/grub/grub.cfg``, without what names a local root (``root=``, ``initrd=``,
``BOOT_IMAGE=``); a network boot adds its own. The root partition is the first one
holding ``/etc/os-release`` or ``/usr/lib/os-release`` (Linux numbers it for
``root=/dev/nbd0pN``), else the one the kernel came from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from lamina.errors import InvalidInput, NotFound
from lamina.netboot.ext4 import Ext4, is_ext
from lamina.netboot.partitions import Partition, ReadAt, partitions

KERNEL = "vmlinuz"
INITRD = "initrd.img"
_PAIRS = (("/boot/vmlinuz", "/boot/initrd.img"), ("/vmlinuz", "/initrd.img"))
_EXTLINUX = ("/boot/extlinux/extlinux.conf", "/extlinux/extlinux.conf", "/boot/extlinux.conf")
_GRUB = ("/boot/grub/grub.cfg", "/grub/grub.cfg")
_OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")
_LOCAL_ARGS = re.compile(r"^(root|initrd|BOOT_IMAGE|rootfstype)=")
_VERSIONED = re.compile(r"^vmlinuz-(?P<version>.+)$")
_META = "boot.json"


@dataclass(frozen=True, slots=True)
class BootInfo:
    """Where an image version's boot files were found, and its kernel arguments."""

    kernel: str  # path inside the file system, symlinks resolved by the lookup
    initrd: str
    args: str  # the image's own kernel arguments, local-root ones removed
    boot_partition: int  # the partition the kernel and initrd came from (0: whole disk)
    root_partition: int  # the partition to root on (root=/dev/nbd0pN; 0: the whole disk)
    kernel_size: int
    initrd_size: int


@dataclass(frozen=True, slots=True)
class BootFiles:
    info: BootInfo
    kernel: bytes
    initrd: bytes


def _file_systems(read: ReadAt, size: int) -> list[tuple[Partition, Ext4]]:
    found, refused = [], []
    for part in partitions(read, size):
        if is_ext(read, part.offset):
            try:
                found.append((part, Ext4(read, part.offset)))
            except InvalidInput as exc:
                refused.append(f"partition {part.number}: {exc}")
    if not found and refused:
        raise InvalidInput("; ".join(refused))
    return found


def _exists(fs: Ext4, path: str) -> bool:
    try:
        return fs.lookup(path).is_file
    except (NotFound, InvalidInput):
        return False


def _pair(fs: Ext4) -> tuple[str, str] | None:
    for kernel, initrd in _PAIRS:
        if _exists(fs, kernel) and _exists(fs, initrd):
            return kernel, initrd
    for folder in ("/boot", "/"):
        try:
            names = fs.listdir(folder)
        except (NotFound, InvalidInput):
            continue
        versions = sorted(
            (m["version"] for n in names if (m := _VERSIONED.match(n))),
            key=_version_key,
            reverse=True,
        )
        for version in versions:
            base = folder.rstrip("/")
            if f"initrd.img-{version}" in names:
                return f"{base}/vmlinuz-{version}", f"{base}/initrd.img-{version}"
    return None


def _version_key(version: str) -> list[tuple[int, str]]:
    """6.1.0-10 sorts after 6.1.0-9: numbers compare as numbers."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", version)]


def extlinux_args(text: str) -> str | None:
    """The APPEND line of the DEFAULT label (else of the first label)."""
    default: str | None = None
    current: str | None = None
    labels: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        word, _, rest = line.partition(" ")
        key = word.upper()
        if key == "DEFAULT":
            default = rest.strip()
        elif key == "LABEL":
            current = rest.strip()
            labels.setdefault(current, "")
        elif key == "APPEND" and current is not None:
            labels[current] = rest.strip()
    if not labels:
        return None
    return labels.get(default or "", next(iter(labels.values())))


def grub_args(text: str) -> str | None:
    """The arguments of the first ``linux`` line (the default entry in Debian's grub.cfg)."""
    for raw in text.splitlines():
        words = raw.split()
        if len(words) >= 2 and words[0] in ("linux", "linuxefi"):
            return " ".join(words[2:])
    return None


def strip_local(args: str) -> str:
    return " ".join(a for a in args.split() if not _LOCAL_ARGS.match(a))


def _args(systems: list[tuple[Partition, Ext4]]) -> str:
    for _part, fs in systems:
        for path in _EXTLINUX:
            if _exists(fs, path):
                found = extlinux_args(fs.read_file(path).decode(errors="replace"))
                if found is not None:
                    return strip_local(found)
        for path in _GRUB:
            if _exists(fs, path):
                found = grub_args(fs.read_file(path).decode(errors="replace"))
                if found is not None:
                    return strip_local(found)
    return ""


def find_boot_files(read: ReadAt, size: int) -> BootFiles:
    """Kernel, initrd and arguments of the disk read by ``read``; NotFound names what is
    missing, InvalidInput a table or file system that is damaged."""
    systems = _file_systems(read, size)
    if not systems:
        raise NotFound("the image has no ext2/3/4 file system to boot a kernel from")
    for part, fs in systems:
        pair = _pair(fs)
        if pair is None:
            continue
        kernel, initrd = fs.read_file(pair[0]), fs.read_file(pair[1])
        root = next(
            (p.number for p, f in systems if any(_exists(f, r) for r in _OS_RELEASE)),
            part.number,
        )
        info = BootInfo(
            kernel=pair[0],
            initrd=pair[1],
            args=_args(systems),
            boot_partition=part.number,
            root_partition=root,
            kernel_size=len(kernel),
            initrd_size=len(initrd),
        )
        return BootFiles(info, kernel, initrd)
    raise NotFound(
        "the image has no kernel and initrd to boot from the network "
        "(looked for /boot/vmlinuz + /boot/initrd.img, /vmlinuz + /initrd.img, "
        "and vmlinuz-VERSION + initrd.img-VERSION in /boot)"
    )


class BootCache:
    """Boot files kept on disk per image version (``DIR/<manifest id>/``): read from the
    image once, then served from files. A version's manifest never changes, so an entry
    never goes stale; a new version gets its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def folder(self, manifest_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", manifest_id):
            raise InvalidInput(f"bad manifest id {manifest_id!r}")
        return self.root / manifest_id

    def lookup(self, manifest_id: str) -> tuple[Path, BootInfo] | None:
        """The version's boot files if they were read out already (no image read)."""
        folder = self.folder(manifest_id)
        info = self._load(folder)
        return None if info is None else (folder, info)

    def get(self, manifest_id: str, read: ReadAt, size: int) -> tuple[Path, BootInfo]:
        """The folder holding ``vmlinuz``, ``initrd.img`` and ``boot.json`` for the
        version, extracted on first use (one thread per version does it)."""
        folder = self.folder(manifest_id)
        with self._guard:
            lock = self._locks.setdefault(manifest_id, threading.Lock())
        with lock:
            info = self._load(folder)
            if info is None:
                info = self._extract(folder, read, size)
        return folder, info

    def _load(self, folder: Path) -> BootInfo | None:
        try:
            data = json.loads((folder / _META).read_text())
            return BootInfo(**data)
        except (OSError, ValueError, TypeError):
            return None

    def _extract(self, folder: Path, read: ReadAt, size: int) -> BootInfo:
        files = find_boot_files(read, size)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".boot-", dir=self.root))
        try:
            (tmp / KERNEL).write_bytes(files.kernel)
            (tmp / INITRD).write_bytes(files.initrd)
            (tmp / _META).write_text(json.dumps(asdict(files.info), indent=2) + "\n")
            shutil.rmtree(folder, ignore_errors=True)  # a partial one from a crash
            os.replace(tmp, folder)  # another process may have won: both are the same
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if self._load(folder) is None:
                raise
        return files.info
