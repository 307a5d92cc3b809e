"""Write an image version out as a sparse raw file, or in any format import takes (qcow2,
vmdk, vhdx, vpc) through qemu-img from a raw file beside the output."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from lamina.errors import UsageError
from lamina.image import qemu
from lamina.image.manifest import Manifest
from lamina.image.reader import ImageReader
from lamina.store import ChunkCache, ChunkStore

Progress = Callable[[int], None]


def export_image(
    store: ChunkStore,
    manifest: Manifest,
    out: Path,
    *,
    fmt: str = "raw",
    progress: Progress | None = None,
) -> None:
    if fmt not in qemu.FORMATS:
        raise UsageError(f"export format must be one of {', '.join(qemu.FORMATS)}, not {fmt!r}")
    if fmt == "raw":
        _write_raw(store, manifest, out, progress)
        return
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        raw = Path(tmp, "image.raw")
        _write_raw(store, manifest, raw, progress)
        qemu.convert(raw, out, src_fmt="raw", dst_fmt=fmt)


def _write_raw(store: ChunkStore, manifest: Manifest, out: Path, progress: Progress | None) -> None:
    # Chunks are read once each, so a small cache is enough.
    reader = ImageReader(store, manifest, ChunkCache(8 << 20))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, manifest.size)  # holes wherever a chunk is zero
        for index in range(manifest.count):
            if not reader.is_zero(index):
                os.pwrite(fd, reader.chunk(index), index * manifest.chunk_size)
            if progress is not None:
                progress(manifest.chunk_len(index))
        os.fsync(fd)
    finally:
        os.close(fd)
