"""A compressed image archive (``docker save | gzip``, an OCI layout tar.zst) unpacked to
a folder, its layers being read out of order, without letting it fill the disk.

A 202 KB archive once made lamina write 6 GB into HOME/tmp, on the filesystem the
machines' deltas live on, before it was found not to be an image at all. Here:

- only what an image archive holds is unpacked: ``oci-layout``, ``index.json``,
  ``manifest.json``, ``repositories``, ``blobs/ALGORITHM/HEX``, and the legacy
  ``docker save`` members (``ID/layer.tar``, ``ID/json``, ``ID/VERSION``, and the
  configuration, ``ID.json``, or any top-level ``NAME.json``);
  any other member ends the import at once, and so do links that leave the archive;
- a member's size is its claim, read from its header before its data: one that would
  take the total past the limit ends the import before a byte of it is written;
- the limit is the least of ``LAMINA_IMPORT_UNPACK_BYTES`` (64 GiB by default), the free
  space of the folder minus 1 GiB, and ``RATIO`` times the compressed bytes read so far
  (at least ``FLOOR``), checked while data is written: an image's layers are tars that
  compress a few times, or are compressed already; zeros compress 1,000 to 30,000 times.

Symbolic links between members (legacy ``docker save`` shares a layer that way) become
hard links, so the folder holds regular files only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import IO

from lamina import settings as config
from lamina.errors import InvalidInput
from lamina.layer import paths
from lamina.layer.sources import READ_ERRORS, unwrapped

LIMIT = 64 << 30
RATIO = 1000
FLOOR = 64 << 20
RESERVE = 1 << 30
_PIECE = 1 << 20
_HEX = r"[a-f0-9]{64}"
_LAYOUT = re.compile(
    rf"oci-layout|repositories|[^/]+\.json|blobs|blobs/[a-z0-9]+"
    rf"|blobs/[a-z0-9]+/[a-f0-9]{{32,128}}|{_HEX}|{_HEX}/(layer\.tar|json|VERSION)"
)


class _Budget:
    """How many bytes the unpacking may still write."""

    def __init__(self, source: Path, raw: IO[bytes], dest: Path) -> None:
        self.source = source
        self.raw = raw
        free = shutil.disk_usage(dest).free - RESERVE
        self.limit = max(0, min(config.load().import_unpack_bytes or LIMIT, free))
        self.written = 0

    def _refuse(self, bound: int, why: str) -> InvalidInput:
        return InvalidInput(
            f"{self.source}: unpacks to more than {bound >> 20} MiB ({why}); import the"
            " uncompressed archive instead (it is read in place)"
        )

    def claim(self, size: int) -> None:
        if self.written + size > self.limit:
            raise self._refuse(self.limit, "the limit on unpacking, or the free space")

    def wrote(self, n: int) -> None:
        self.written += n
        ratio = max(FLOOR, RATIO * self.raw.tell())
        if self.written > ratio:
            raise self._refuse(ratio, f"over {RATIO} times the bytes it was unpacked from")


def unpack_image(source: Path, dest: Path) -> None:
    """Unpack the compressed image archive ``source`` into the folder ``dest``."""
    links: list[tuple[str, str]] = []
    with open(source, "rb") as raw, contextlib.closing(unwrapped(raw)) as stream:
        budget = _Budget(source, raw, dest)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                for ti in tf:
                    name = _checked_name(source, ti)
                    if ti.isdir():
                        (dest / name).mkdir(parents=True, exist_ok=True)
                    elif ti.issym() or ti.islnk():
                        links.append((name, _link_target(source, name, ti)))
                    elif ti.isreg():
                        budget.claim(ti.size)
                        _write(tf, ti, dest / name, budget)
                    else:
                        raise InvalidInput(f"{source}: {ti.name!r} is not a file")
        except READ_ERRORS as exc:
            raise InvalidInput(f"{source}: not a readable tar archive ({exc})") from None
    for name, target in links:
        if not (dest / target).is_file() or (dest / target).is_symlink():
            raise InvalidInput(f"{source}: link {name!r} -> {target!r}: no such member")
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).unlink(missing_ok=True)
        os.link(dest / target, dest / name)


def _checked_name(source: Path, ti: tarfile.TarInfo) -> str:
    name = paths.normalize(ti.name, what="image archive entry")
    if name and not _LAYOUT.fullmatch(name):
        raise InvalidInput(
            f"{source}: {name[:100]!r} is not part of an OCI image layout or a docker save archive"
        )
    return name


def _link_target(source: Path, name: str, ti: tarfile.TarInfo) -> str:
    """The member a link names, as a path of the archive (refused when it leaves it)."""
    target = ti.linkname
    if ti.issym():
        target = os.path.normpath(os.path.join(os.path.dirname(name), target))
    if target.startswith(("/", "../")) or target == "..":
        raise InvalidInput(f"{source}: link {name!r} -> {ti.linkname!r} leaves the archive")
    return paths.normalize(target, what="image archive link")


def _write(tf: tarfile.TarFile, ti: tarfile.TarInfo, path: Path, budget: _Budget) -> None:
    data = tf.extractfile(ti)
    if data is None:
        raise InvalidInput(f"{budget.source}: cannot read {ti.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        while piece := data.read(_PIECE):
            out.write(piece)
            budget.wrote(len(piece))
