"""Layer sources: where a tree's members come from (the LayerSource seam).

A source is read twice. ``scan`` reports every member's metadata to a ``TreeBuilder``,
which checks and applies it; nothing is written during a scan, so a hostile archive is
refused before any chunk is stored. ``read`` then hands over the data of the regular files
that survived (``wanted``), in source order.

- ``DirSource``: a directory (with ``changes=True``, an overlayfs upper directory: 0/0
  character devices are whiteouts and ``trusted.overlay.opaque`` marks opaque directories).
- ``TarSource``: a tar stream, plain or compressed (gzip, zstd, bzip2, xz, told apart by
  their magic), optionally checked against a digest (OCI blobs: ``Digest``).
Image archives (OCI layouts, ``docker save``) are in ``lamina.layer.oci``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import stat
import tarfile
import zlib
from base64 import b64decode
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, BinaryIO, Protocol
from urllib.parse import unquote

import zstandard

from lamina.errors import InvalidInput, NotFound
from lamina.layer.builder import DataRef, Member, TreeBuilder, member_kind
from lamina.layer.tree import OPAQUE_XATTR, OVERLAY_XATTRS, Kind, Xattrs

Sink = Callable[[DataRef, IO[bytes]], None]
Opener = Callable[[], BinaryIO]
Digest = tuple[str, str]  # (hashlib algorithm name, lower-case hex)


class LayerSource(Protocol):
    description: str

    def scan(self, builder: TreeBuilder) -> None:
        """Report every member to ``builder`` (metadata only, nothing written)."""

    def read(self, wanted: Mapping[DataRef, str], sink: Sink) -> None:
        """Call ``sink`` with the data of each wanted regular file."""


# -- directories ------------------------------------------------------------------------------


def _xattrs(path: str) -> tuple[Xattrs, bool]:
    """A file's xattrs (overlayfs' own left out) and whether it is an opaque directory."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return (), False
    out, opaque = [], False
    for name in sorted(names):
        if name.startswith(OVERLAY_XATTRS):
            opaque = opaque or (
                name == OPAQUE_XATTR and os.getxattr(path, name, follow_symlinks=False) == b"y"
            )
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue  # vanished, or not readable (e.g. a security module's)
    return tuple(out), opaque


class DirSource:
    def __init__(self, root: Path, *, changes: bool = False) -> None:
        if not root.is_dir():
            raise NotFound(f"{root}: no such directory")
        self.root = root
        self.changes = changes
        self.description = str(root)
        self.skipped: list[str] = []  # sockets
        self._files: list[str] = []

    def _walk(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every path beneath the root, parents first (depth-first, names sorted; a stack,
        not recursion, so depth is not limited by Python's)."""
        pending = [""]
        while pending:
            rel = pending.pop()
            with os.scandir(os.path.join(self.root, rel) if rel else self.root) as it:
                children = sorted(it, key=lambda d: d.name)
            subdirs = []
            for child in children:
                path = f"{rel}/{child.name}" if rel else child.name
                st = child.stat(follow_symlinks=False)
                yield path, st
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(path)
            pending += reversed(subdirs)

    def scan(self, builder: TreeBuilder) -> None:
        seen: dict[tuple[int, int], str] = {}
        if not self.changes:  # an upper directory's own metadata is not a change
            root = self._member("", os.lstat(self.root), seen)
            if root is not None:
                builder.add(root)
        for path, st in self._walk():
            member = self._member(path, st, seen)
            if member is not None:
                builder.add(member)

    def _member(
        self, path: str, st: os.stat_result, seen: dict[tuple[int, int], str]
    ) -> Member | None:
        full = os.path.join(self.root, path) if path else str(self.root)
        kind = member_kind(st.st_mode)
        if kind is None:
            self.skipped.append(path)
            return None
        target, ref = "", None
        if kind is Kind.CHAR and self.changes and st.st_rdev == 0:
            kind = Kind.WHITEOUT
        elif kind is Kind.SYMLINK:
            target = os.fsdecode(os.readlink(full))
        elif kind is Kind.FILE and st.st_nlink > 1 and (st.st_dev, st.st_ino) in seen:
            kind, target = Kind.HARDLINK, seen[(st.st_dev, st.st_ino)]
        elif kind is Kind.FILE:
            if st.st_nlink > 1:
                seen[(st.st_dev, st.st_ino)] = path
            ref = (0, len(self._files))
            self._files.append(full)
        xattrs, opaque = _xattrs(full) if kind is not Kind.WHITEOUT else ((), False)
        return Member(
            path,
            kind,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            st.st_size,
            target,
            st.st_rdev if kind in (Kind.CHAR, Kind.BLOCK) else 0,
            xattrs,
            ref,
            opaque and self.changes,
        )

    def read(self, wanted: Mapping[DataRef, str], sink: Sink) -> None:
        for ref in sorted(wanted):
            fd = os.open(self._files[ref[1]], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb", buffering=0) as f:
                sink(ref, f)


# -- tar streams ------------------------------------------------------------------------------


def unwrapped(raw: BinaryIO, via: BinaryIO | None = None) -> IO[bytes]:
    """``raw`` (at its start, seekable) unwrapped from gzip/zstd/bzip2/xz, told apart by
    its magic; read through ``via`` when given (a reader over ``raw``, such as a hasher)."""
    head = raw.read(6)
    raw.seek(0)
    src = raw if via is None else via
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=src, mode="rb")  # type: ignore[return-value]
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
    if head.startswith(b"BZh"):
        return bz2.BZ2File(src)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(src)
    return src


class _Hashing:
    """A reader that hashes what passes through (for OCI blob digests)."""

    def __init__(self, raw: BinaryIO, algorithm: str) -> None:
        self.raw = raw
        self.sha = hashlib.new(algorithm)

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, lzma.LZMAError, zstandard.ZstdError)


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    exact = ti.pax_headers.get("mtime")
    try:
        return int(Decimal(exact) * 1_000_000_000) if exact else int(ti.mtime) * 1_000_000_000
    except (InvalidOperation, ValueError):
        return int(ti.mtime) * 1_000_000_000


def _tar_xattrs(ti: tarfile.TarInfo) -> Xattrs:
    out = []
    for key, value in ti.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out.append((key[13:], value.encode("utf-8", "surrogateescape")))
        elif key.startswith("LIBARCHIVE.xattr."):
            out.append((unquote(key[17:]), b64decode(value + "=" * (-len(value) % 4))))
    return tuple(sorted(x for x in out if not x[0].startswith(OVERLAY_XATTRS)))


def _rdev(ti: tarfile.TarInfo) -> int:
    try:
        return os.makedev(ti.devmajor, ti.devminor)
    except (OverflowError, ValueError):
        raise InvalidInput(
            f"tar member {ti.name!r}: device numbers {ti.devmajor},{ti.devminor} out of range"
        ) from None


def tar_member(ti: tarfile.TarInfo, ref: DataRef) -> Member:
    if ti.isreg():
        kind = Kind.FILE
    elif ti.isdir():
        kind = Kind.DIR
    elif ti.issym():
        kind = Kind.SYMLINK
    elif ti.islnk():
        kind = Kind.HARDLINK
    elif ti.ischr():
        kind = Kind.CHAR
    elif ti.isblk():
        kind = Kind.BLOCK
    elif ti.isfifo():
        kind = Kind.FIFO
    else:
        raise InvalidInput(f"tar member {ti.name!r}: unsupported type {ti.type!r}")
    return Member(
        ti.name,
        kind,
        ti.mode & 0o7777,
        ti.uid,
        ti.gid,
        _mtime_ns(ti),
        ti.size if kind is Kind.FILE else 0,
        ti.linkname,
        _rdev(ti) if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        _tar_xattrs(ti),
        ref if kind is Kind.FILE else None,
    )


class TarSource:
    def __init__(
        self, opener: Opener, description: str, *, part: int = 0, digest: Digest | None = None
    ) -> None:
        self.opener = opener
        self.description = description
        self.part = part
        self.digest = digest
        self._names: list[str] = []

    @classmethod
    def from_path(cls, path: Path) -> TarSource:
        if not path.is_file():
            raise NotFound(f"{path}: no such file")
        return cls(lambda: open(path, "rb"), str(path))

    def _members(self, hashing: bool) -> Iterator[tuple[int, tarfile.TarInfo, tarfile.TarFile]]:
        raw = self.opener()
        try:
            # The digest names the blob as stored: hash the bytes before decompression.
            tap = _Hashing(raw, self.digest[0]) if hashing and self.digest else None
            stream = unwrapped(raw, tap)  # type: ignore[arg-type]
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                for i, ti in enumerate(tf):
                    yield i, ti, tf
            if tap is not None and self.digest and tap.drain() != self.digest[1]:
                raise InvalidInput(f"{self.description}: {self.digest[0]} digest does not match")
        except READ_ERRORS as exc:
            raise InvalidInput(f"{self.description}: not a readable tar archive ({exc})") from None
        finally:
            raw.close()

    def scan(self, builder: TreeBuilder) -> None:
        builder.begin_layer()
        self._names = []
        for i, ti, _tf in self._members(hashing=self.digest is not None):
            self._names.append(ti.name)
            builder.add(tar_member(ti, (self.part, i)))
        builder.end_layer()

    def read(self, wanted: Mapping[DataRef, str], sink: Sink) -> None:
        mine = {ref for ref in wanted if ref[0] == self.part}
        if not mine:
            return
        last = max(i for _, i in mine)
        for i, ti, tf in self._members(hashing=False):
            if i >= len(self._names) or ti.name != self._names[i]:
                raise InvalidInput(f"{self.description} changed while it was being imported")
            if (self.part, i) in mine:
                data = tf.extractfile(ti)
                if data is None:
                    raise InvalidInput(f"{self.description}: cannot read {ti.name!r}")
                sink((self.part, i), data)
            if i >= last:
                break
