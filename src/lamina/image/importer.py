"""Import a disk image file into the chunk store as a manifest."""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lamina.errors import InvalidInput, NotFound, UsageError
from lamina.image import qemu
from lamina.image.manifest import Manifest
from lamina.store import ZERO_ID, ChunkStore, Writer, chunk_id, codec
from lamina.store.backends.base import Buffer
from lamina.store.chunker import IMAGE_CHUNK, chunks_with_data

Progress = Callable[[int], None]
T = TypeVar("T")
R = TypeVar("R")
# Chunks per pool task: 16 x 256 KiB = 4 MiB, so dispatch costs (futures, the GIL) are
# paid 256 times per GiB instead of 4096 times.
_GROUP = 16


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
    detected = fmt or qemu.sniff(path) or str(qemu.info(path).get("format", "raw"))
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
    qemu.check_self_contained(path, source)
    qemu.check(path, source)
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="import-") as tmp:
        raw = Path(tmp, "image.raw")
        qemu.convert(path, raw, src_fmt=source, dst_fmt="raw")
        return _import_raw(writer, raw, chunk_size, source, progress)


def import_and_commit(
    store: ChunkStore,
    path: Path,
    commit: Callable[[Imported], R],
    *,
    fmt: str | None = None,
    tmp_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[R, Imported]:
    """Import ``path`` and run ``commit`` (which records the manifest somewhere) while the
    store's shared lock is still held: a concurrent gc cannot collect a chunk this import
    found already present and reused, because gc reads the live set only after commit."""
    with store.writer() as writer:
        imported = import_file(writer, path, fmt=fmt, tmp_dir=tmp_dir, progress=progress)
        writer.flush()
        return commit(imported), imported


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


@dataclass(slots=True)
class _Chunked:
    index: int
    cid: bytes
    length: int
    envelope: tuple[bytes, Buffer] | None  # set when the chunk is new


def _import_raw(
    writer: Writer, path: Path, chunk_size: int, source: str, progress: Progress | None
) -> Imported:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = _device_size(fd)
        table = bytearray(ZERO_ID * -(-size // chunk_size))
        chunks = new = stored = done = bytes_read = 0

        local = threading.local()

        def work(group: list[int]) -> list[_Chunked]:
            # Runs on a pool thread: preadv, BLAKE3 and zstd all release the GIL. Reading
            # into a per-thread buffer instead of a fresh bytes per chunk saved the page
            # faults of 1 GiB of new allocations (a quarter of an import's CPU).
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = bytearray(chunk_size)
            out = []
            for index in group:
                n = min(chunk_size, size - index * chunk_size)
                view = memoryview(buf)[:n]
                if os.preadv(fd, [view], index * chunk_size) != n:
                    raise InvalidInput(f"{path}: short read at {index * chunk_size} (file shrank?)")
                if codec.is_zero(buf if n == chunk_size else buf[:n]):
                    out.append(_Chunked(index, ZERO_ID, n, None))
                    continue
                cid = chunk_id(view)
                env = None
                if not writer.has(cid):
                    data = bytes(view)  # kept until its pack is written
                    env = codec.encode_parts(data, cid, writer.level)
                out.append(_Chunked(index, cid, n, env))
            return out

        with ThreadPoolExecutor(max_workers=_workers()) as pool:
            groups = _groups(chunks_with_data(fd, size, chunk_size), _GROUP)
            for result in _bounded_map(pool, work, groups, window=2 * _workers()):
                for c in result:
                    bytes_read += c.length
                    chunks += 1
                    table[c.index * 32 : c.index * 32 + 32] = c.cid
                    if c.envelope is not None:
                        put = writer.put_envelope(c.cid, *c.envelope)
                        new += put.new
                        stored += put.stored
                if progress is not None and result:
                    reached = min(size, (result[-1].index + 1) * chunk_size)
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


def _workers() -> int:
    # One more thread than cores: while one waits in pread, the others hash.
    return min(8, (os.cpu_count() or 2) + 2)


def _bounded_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterator[T], window: int
) -> Iterator[R]:
    """``pool.map`` in order, with at most ``window`` tasks in flight (bounded memory)."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _groups(items: Iterator[int], n: int) -> Iterator[list[int]]:
    group: list[int] = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group
