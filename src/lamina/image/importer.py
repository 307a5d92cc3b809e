"""Import a disk image file into the chunk store as a manifest."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import InvalidInput, NotFound, UsageError
from lamina.image import qemu
from lamina.image.manifest import Manifest
from lamina.store import ZERO_ID, Writer, chunk_id, codec
from lamina.store.chunker import IMAGE_CHUNK, chunks_with_data

Progress = Callable[[int], None]
# Chunks handed to the worker pool at once: enough to keep 2-4 workers busy, small
# enough that memory stays near 64 x 256 KiB = 16 MiB.
_BATCH = 64


@dataclass(frozen=True, slots=True)
class ImportStats:
    size: int
    bytes_read: int
    chunks: int
    new_chunks: int
    stored_bytes: int
    source_format: str


@dataclass(frozen=True, slots=True)
class Imported:
    manifest: Manifest
    manifest_id: bytes
    stats: ImportStats


def detect_format(path: Path, fmt: str | None) -> str:
    """The image format, from ``fmt`` or by asking qemu-img; checks raw files' geometry."""
    if not path.exists():
        raise NotFound(f"{path}: no such file")
    st = path.stat()
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidInput(f"{path} is not a file")
    if fmt is not None and fmt not in qemu.FORMATS:
        raise UsageError(f"unknown format {fmt!r} (one of {', '.join(qemu.FORMATS)})")
    detected = fmt or str(qemu.info(path).get("format", "raw"))
    if detected not in qemu.FORMATS:
        raise InvalidInput(f"{path}: unsupported image format {detected}")
    if detected == "raw" and stat.S_ISREG(st.st_mode) and (st.st_size == 0 or st.st_size % 512):
        raise InvalidInput(
            f"{path} is not a disk image: raw images are a non-zero multiple of 512 bytes "
            f"({st.st_size} bytes)"
        )
    return detected


def import_file(
    writer: Writer,
    path: Path,
    *,
    fmt: str | None = None,
    chunk_size: int = IMAGE_CHUNK,
    tmp_dir: Path | None = None,
    progress: Progress | None = None,
) -> Imported:
    """Chunk ``path`` into the store; converts non-raw formats with qemu-img first."""
    source = detect_format(path, fmt)
    if source == "raw":
        return _import_raw(writer, path, chunk_size, source, progress)
    qemu.check(path, source)
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="import-") as tmp:
        raw = Path(tmp, "image.raw")
        qemu.convert(path, raw, src_fmt=source, dst_fmt="raw")
        return _import_raw(writer, raw, chunk_size, source, progress)


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _import_raw(
    writer: Writer, path: Path, chunk_size: int, source: str, progress: Progress | None
) -> Imported:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = _device_size(fd)
        table = bytearray(ZERO_ID * -(-size // chunk_size))
        bytes_read = chunks = new = stored = done = 0

        def work(index: int) -> tuple[int, bytes, bytes | None, int]:
            data = os.pread(fd, min(chunk_size, size - index * chunk_size), index * chunk_size)
            if codec.is_zero(data):
                return index, ZERO_ID, None, len(data)
            cid = chunk_id(data)
            env = None if writer.has(cid) else codec.encode(data, cid, writer.level)
            return index, cid, env, len(data)

        with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 2) + 1)) as pool:
            for batch in _batches(chunks_with_data(fd, size, chunk_size), _BATCH):
                for index, cid, env, n in pool.map(work, batch):
                    bytes_read += n
                    chunks += 1
                    table[index * 32 : index * 32 + 32] = cid
                    if env is not None:
                        result = writer.put_envelope(cid, env)
                        new += result.new
                        stored += result.stored
                if progress is not None:
                    reached = min(size, (batch[-1] + 1) * chunk_size)
                    progress(reached - done)
                    done = reached
        if progress is not None and done < size:
            progress(size - done)
    finally:
        os.close(fd)
    manifest = Manifest(size, chunk_size, bytes(table))
    put = writer.put(manifest.to_bytes())
    stats = ImportStats(size, bytes_read, chunks, new, stored + put.stored, source)
    return Imported(manifest, put.chunk_id, stats)


def _batches(items: Iterator[int], n: int) -> Iterator[list[int]]:
    batch: list[int] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
