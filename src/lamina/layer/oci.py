"""Image archives as layer sources: OCI image layouts and ``docker save`` archives.

An image is flattened into one layer: its layer tars are applied in order by one
``TreeBuilder``, whiteouts hiding what lower layers provided. Supported shapes:

- an OCI image layout, as a directory or a tar (``oci-layout``, ``index.json``, ``blobs/``);
  an index pointing at more indexes is followed; among several manifests the one for this
  machine's architecture (linux) is taken, else the first;
- a ``docker save`` archive (``manifest.json`` listing ``Layers``), old and new formats;
  with several images in one archive, the first is taken.

Every blob is checked against its digest: manifests and indexes before they are parsed
(at most ``MAX_JSON`` bytes), layers while they are scanned. OCI allows sha256 and sha512
(``ALGORITHMS``); any other algorithm is refused, as is a blob of an OCI layout folder
that is a symlink, or lies beneath one (it could name any file of the host). A compressed
archive (``docker save | gzip``) is unpacked to a temporary folder first, since its
layers are read out of order, within the bounds of ``lamina.layer.unpack``.

``open_source`` picks the right source for any SRC path ``layer import`` accepts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from lamina.errors import InvalidInput, NotFound, UnsafeArchive
from lamina.layer import paths
from lamina.layer.builder import DataRef, TreeBuilder
from lamina.layer.sources import (
    READ_ERRORS,
    Digest,
    DirSource,
    LayerSource,
    Opener,
    Sink,
    TarSource,
    unwrapped,
)
from lamina.layer.unpack import unpack_image

# The OCI image spec's digest grammar, and the algorithms it registers (hex lengths).
_DIGEST = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
ALGORITHMS = {"sha256": 64, "sha512": 128}
# Indexes and manifests are a few KiB; a larger one is not read.
MAX_JSON = 4 << 20
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


class _Archive(Protocol):
    def exists(self, name: str) -> bool: ...

    def opener(self, name: str) -> Opener: ...


class _DirArchive:
    """An image layout folder. Members are opened one component at a time, none
    followed if it is a symlink."""

    def __init__(self, root: Path, description: str | None = None) -> None:
        self.root = root
        self.description = description or str(root)

    def _open(self, name: str) -> int:
        parts = paths.normalize(name, what="image archive entry").split("/")
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    child = os.open(part, flags | (0 if last else os.O_DIRECTORY), dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(
                        self.root.joinpath(*parts[: i + 1])
                    ):
                        raise UnsafeArchive(
                            f"{self.description}: {'/'.join(parts[: i + 1])} is a symlink"
                        ) from None
                    raise
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def exists(self, name: str) -> bool:
        try:
            os.close(self._open(name))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def opener(self, name: str) -> Opener:
        if not self.exists(name):
            raise InvalidInput(f"{self.description}: missing {name}")
        return lambda: os.fdopen(self._open(name), "rb")


class _TarArchive:
    def __init__(self, tf: tarfile.TarFile, description: str) -> None:
        self.tf = tf
        self.description = description
        self.names = {paths.normalize(m.name, what="image archive entry"): m for m in tf}

    def exists(self, name: str) -> bool:
        return name in self.names

    def opener(self, name: str) -> Opener:
        member = self.names.get(name)
        if member is None:
            raise InvalidInput(f"{self.description}: missing {name}")

        def open_member() -> BinaryIO:
            f = self.tf.extractfile(member)
            if f is None:
                raise InvalidInput(f"{self.description}: {name} is not a file")
            return f  # type: ignore[return-value]

        return open_member


def _json(archive: _Archive, name: str, digest: Digest | None = None) -> Any:
    with archive.opener(name)() as f:
        data = f.read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise InvalidInput(f"{name}: larger than {MAX_JSON >> 20} MiB, not an image's JSON")
    if digest is not None and hashlib.new(digest[0], data).hexdigest() != digest[1]:
        raise InvalidInput(f"{name}: {digest[0]} digest does not match")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{name}: not JSON ({exc})") from None


def _blob(digest: object) -> tuple[str, Digest]:
    """The archive path and the digest of a blob named by ``digest``."""
    m = _DIGEST.match(str(digest))
    if not m:
        raise InvalidInput(f"bad blob digest {str(digest)[:100]!r}")
    algorithm, encoded = m[1], m[2]
    length = ALGORITHMS.get(algorithm)
    if length is None:
        raise InvalidInput(
            f"digest algorithm {algorithm!r} is not supported: OCI images use sha256 or sha512"
        )
    if not re.fullmatch(f"[a-f0-9]{{{length}}}", encoded):
        raise InvalidInput(f"bad {algorithm} digest {str(digest)[:160]!r}")
    return f"blobs/{algorithm}/{encoded}", (algorithm, encoded)


def _pick(archive: _Archive, index: Mapping[str, Any], depth: int = 0) -> Mapping[str, Any]:
    """The image manifest an index leads to (this machine's architecture when listed)."""
    manifests = index.get("manifests") or []
    if not manifests or depth > 4:
        raise InvalidInput("image index lists no usable manifest")
    arch = _ARCH.get(platform.machine(), platform.machine())
    chosen = next(
        (
            m
            for m in manifests
            if (m.get("platform") or {}).get("architecture") == arch
            and (m.get("platform") or {}).get("os", "linux") == "linux"
        ),
        manifests[0],
    )
    doc = _json(archive, *_blob(chosen.get("digest", "")))
    if chosen.get("mediaType") in _INDEX_TYPES or "manifests" in doc:
        return _pick(archive, doc, depth + 1)
    return doc  # type: ignore[no-any-return]


def image_layers(archive: _Archive) -> list[tuple[str, Digest | None]]:
    """(archive name, digest or None) of each layer tar, bottom first."""
    if archive.exists("manifest.json"):
        doc = _json(archive, "manifest.json")
        if not isinstance(doc, list) or not doc or "Layers" not in doc[0]:
            raise InvalidInput("manifest.json is not a docker image manifest")
        out: list[tuple[str, Digest | None]] = []
        for name in doc[0]["Layers"]:
            norm = paths.normalize(str(name), what="docker layer")
            m = re.fullmatch(r"blobs/([a-z0-9]+)/([a-f0-9]+)", norm)
            out.append(_blob(f"{m[1]}:{m[2]}") if m else (norm, None))
        return out
    if archive.exists("index.json"):
        manifest = _pick(archive, _json(archive, "index.json"))
        return [_blob(layer.get("digest", "")) for layer in manifest.get("layers") or []]
    raise InvalidInput("not an image archive: neither manifest.json nor index.json")


class ImageSource:
    """The layer tars of one image, applied bottom first."""

    def __init__(self, archive: _Archive, description: str) -> None:
        self.description = description
        layers = image_layers(archive)
        if not layers:
            raise InvalidInput(f"{description}: the image has no layers")
        self.parts = [
            TarSource(archive.opener(name), f"{description}:{name}", part=i, digest=digest)
            for i, (name, digest) in enumerate(layers)
        ]

    def scan(self, builder: TreeBuilder) -> None:
        for part in self.parts:
            part.scan(builder)

    def read(self, wanted: Mapping[DataRef, str], sink: Sink) -> None:
        for part in self.parts:
            part.read(wanted, sink)


def _looks_like_image(first: str) -> bool:
    """Whether a tar's first member is one an image archive starts with."""
    top = paths.normalize(first).split("/")[0]
    return top in {"blobs", "oci-layout", "index.json", "manifest.json", "repositories"} or bool(
        re.fullmatch(r"[a-f0-9]{64}(\.json)?", top)
    )


def _has_image_marker(names: list[str]) -> bool:
    top = {n[2:] if n.startswith("./") else n for n in names}
    return "manifest.json" in top or "oci-layout" in top


def _first_member(path: Path) -> tuple[bool, str | None]:
    """(compressed?, name of the first member) of a tar file."""
    with open(path, "rb") as raw:
        stream = unwrapped(raw)
        compressed = stream is not raw
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                first = tf.next()
        except READ_ERRORS as exc:
            raise InvalidInput(f"{path}: not a directory or a tar archive ({exc})") from None
    return compressed, first.name if first is not None else None


@contextmanager
def open_source(path: Path, *, tmp_dir: Path) -> Iterator[LayerSource]:
    """The source for a ``layer import`` SRC: a directory, a tar, or an image archive."""
    if path.is_dir():
        if (path / "oci-layout").is_file() or (path / "index.json").is_file():
            yield ImageSource(_DirArchive(path), str(path))
        else:
            yield DirSource(path)
        return
    if not path.is_file():
        raise NotFound(f"{path}: no such file or directory")
    compressed, first = _first_member(path)
    if first is None:
        raise InvalidInput(f"{path}: empty tar archive")
    if not compressed:
        with tarfile.open(path, "r:") as tf:
            if _has_image_marker(tf.getnames()):
                yield ImageSource(_TarArchive(tf, str(path)), str(path))
                return
        yield TarSource.from_path(path)
        return
    if not _looks_like_image(first):
        yield TarSource.from_path(path)
        return
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="image-") as tmp:
        unpack_image(path, Path(tmp))
        yield ImageSource(_DirArchive(Path(tmp), str(path)), str(path))
