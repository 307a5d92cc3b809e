"""An image version as byte ranges of files, shared by every server process through the
page cache: the cold path of a boot storm pays for each chunk once, not once per machine
or per process.

    raw chunks         read in place from their pack, once their hash has been checked
                       (when the store keeps packs as local files)
    compressed chunks  decompressed and checked once, then written at their own offset
                       into a sparse file the size of the image (``NAME.data``); so are
                       the chunks of a store whose packs are not local files, which
                       come through the store (its disk cache, shared by every process)
    NAME.state         which chunks are ready, shared through a MAP_SHARED mmap:

        offset  size  field
        0       4     magic b"LMHS"
        4       1     version (1)
        5       3     reserved, zero
        8       4     chunk size
        12      4     number of chunks n
        16      32    the manifest id (NAME is its hex)
        48      n     per chunk: 0 not ready, 1 raw and checked (read it from its pack),
                      2 checked and in NAME.data

A chunk's byte is set only after its data is in place (the check done, the plaintext
written), so a process killed half-way leaves a chunk "not ready" and the next reader
redoes it. The files live in ``HOME/cache/hydrated`` and are derived data: the server
clears the folder when it starts. Readers look chunks up in arrays built from the chunk
index in one batched query when the version is first opened (16 bytes a chunk).

Threads: ``segments`` runs on the event loop and never touches the disk; ``hydrate`` and
``read`` (which may read packs and decompress) run on worker threads.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import struct
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from lamina.errors import CorruptObject, StoreError
from lamina.image import Manifest
from lamina.store import ZERO_ID, ChunkStore
from lamina.store.codec import CODEC_RAW, HEADER_SIZE, chunk_id, decode, parse_header

MAGIC: Final = b"LMHS"
VERSION: Final = 1
_HEAD = struct.Struct("<4sB3xII32s")
NOT_READY: Final = 0
RAW: Final = 1
HYDRATED: Final = 2

# A segment of a read: (file descriptor, position, length), or (None, 0, length) for zeros.
Segment = tuple[int | None, int, int]


def hydrated_dir(cache_dir: Path) -> Path:
    return cache_dir / "hydrated"


class ImageFiles:
    """One image version in one process (shared by every device on that version)."""

    def __init__(
        self, store: ChunkStore, manifest: Manifest, manifest_id: bytes, directory: Path
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.manifest_id = manifest_id
        self.chunk_size = manifest.chunk_size
        self.size = manifest.size
        self._ids = manifest.table
        self._packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._pack_fds: dict[int, int] = {}
        root = getattr(store.backend, "root", None)  # packs as local files (LocalBackend)
        self._pack_root: Path | None = root if isinstance(root, Path) else None
        self._where = array.array("I", bytes(4 * manifest.count))  # pack number + 1
        self._offset = array.array("Q", bytes(8 * manifest.count))
        self._length = array.array("I", bytes(4 * manifest.count))
        if self._pack_root is not None:  # a bucket's chunks are looked up by the store
            self._locate_all()
        self._lock = threading.Lock()
        self._busy: dict[int, threading.Event] = {}
        self.hydrations = 0  # chunks this process made ready (raw checked or decompressed)
        self._state_fd, self._map = _open_state(directory, manifest, manifest_id)
        self.state = memoryview(self._map)[_HEAD.size : _HEAD.size + manifest.count]
        self._data_fd = _open_data(directory / f"{manifest_id.hex()}.data", manifest.size)

    # -- chunk locations -------------------------------------------------------------

    def _locate_all(self) -> None:
        """Every stored chunk's envelope, from the chunk index in batched queries."""
        ids = self._ids
        wanted = {ids[i * 32 : i * 32 + 32] for i in range(self.manifest.count)}
        wanted.discard(ZERO_ID)
        found = self.store.index.lookup_many(wanted)
        for i in range(self.manifest.count):
            cid = ids[i * 32 : i * 32 + 32]
            loc = found.get(cid)
            if loc is not None:
                self._place(i, loc.pack, loc.offset, loc.size)

    def _place(self, index: int, pack: str, offset: int, length: int) -> None:
        number = self._pack_no.get(pack)
        if number is None:
            number = self._pack_no[pack] = len(self._packs)
            self._packs.append(pack)
        self._where[index] = number + 1
        self._offset[index] = offset
        self._length[index] = length

    def _pack_fd(self, number: int) -> int:
        fd = self._pack_fds.get(number)
        if fd is None:
            assert self._pack_root is not None
            fd = os.open(self._pack_root / self._packs[number], os.O_RDONLY | os.O_CLOEXEC)
            old = self._pack_fds.setdefault(number, fd)
            if old != fd:  # another thread opened it first
                os.close(fd)
                fd = old
        return fd

    # -- the event loop's side -------------------------------------------------------

    def segments(self, offset: int, length: int, out: list[Segment]) -> bool:
        """Append where ``[offset, offset+length)`` lives to ``out``; False (``out`` then
        partly filled) when a chunk is not ready in this process: ``hydrate`` first."""
        cs = self.chunk_size
        state = self.state
        index, within = divmod(offset, cs)
        if not out and within + length <= cs:  # within one chunk: most reads
            kind = state[index]
            if kind == HYDRATED:
                out.append((self._data_fd, offset, length))
                return True
            if kind == RAW:
                fd = self._pack_fds.get(self._where[index] - 1)
                if fd is not None:
                    out.append((fd, self._offset[index] + HEADER_SIZE + within, length))
                    return True
        end = offset + length
        while offset < end:
            index, within = divmod(offset, cs)
            n = min(cs - within, end - offset)
            kind = state[index]
            if kind == HYDRATED:
                if out and out[-1][0] == self._data_fd and out[-1][1] + out[-1][2] == offset:
                    last = out.pop()  # contiguous in the cache file: one read
                    out.append((self._data_fd, last[1], last[2] + n))
                else:
                    out.append((self._data_fd, offset, n))
            elif kind == RAW:
                fd = self._pack_fds.get(self._where[index] - 1)
                if fd is None:
                    return False
                out.append((fd, self._offset[index] + HEADER_SIZE + within, n))
            elif self._ids[index * 32 : index * 32 + 32] == ZERO_ID:
                out.append((None, 0, n))
            else:
                return False
            offset += n
        return True

    # -- worker threads ----------------------------------------------------------------

    def chunks(self, offset: int, length: int) -> range:
        cs = self.chunk_size
        return range(offset // cs, (offset + max(length, 1) - 1) // cs + 1)

    def hydrate(self, indices: Iterable[int]) -> None:
        """Make these chunks readable from files, each checked against its id once."""
        for index in indices:
            if self._ids[index * 32 : index * 32 + 32] == ZERO_ID:
                continue
            kind = self.state[index]
            if kind == HYDRATED or (kind == RAW and self._where[index] - 1 in self._pack_fds):
                continue
            self._claim(index)

    def _claim(self, index: int) -> None:
        """One thread of this process does the work; the others wait for it."""
        with self._lock:
            busy = self._busy.get(index)
            mine = busy is None
            if mine:
                busy = self._busy[index] = threading.Event()
        assert busy is not None
        if not mine:
            busy.wait()
            return
        try:
            self._hydrate_one(index)
        finally:
            with self._lock:
                del self._busy[index]
            busy.set()

    def _hydrate_one(self, index: int) -> None:
        kind = self.state[index]
        if kind == HYDRATED:
            return
        cid = self._ids[index * 32 : index * 32 + 32]
        if self._pack_root is None:
            self._hydrate_remote(index, cid)  # the store looks it up (in new packs too)
            return
        if not self._where[index]:
            raise StoreError(f"chunk {cid[:4].hex()}: not in the store")
        if kind == RAW:  # checked by another process: only the pack is to be opened here
            self._pack_fd(self._where[index] - 1)
            return
        envelope = self._envelope(index)
        head = parse_header(envelope, f"chunk {cid.hex()[:16]}")
        if head.plain_len != self.manifest.chunk_len(index):
            raise CorruptObject(f"chunk {cid.hex()[:16]}: wrong plaintext length", chunk_id=cid)
        if head.codec == CODEC_RAW:
            payload = memoryview(envelope)[HEADER_SIZE:]
            if head.chunk_id != cid or chunk_id(payload) != cid:
                raise CorruptObject(f"chunk {cid.hex()[:16]}: hash mismatch", chunk_id=cid)
            self.state[index] = RAW
        else:
            plain = decode(envelope, expected=cid)
            _pwrite_all(self._data_fd, plain, index * self.chunk_size)
            self.state[index] = HYDRATED
        self.hydrations += 1

    def _hydrate_remote(self, index: int, cid: bytes) -> None:
        """A chunk of a store whose packs are not local files (a bucket): through the
        store, which checks it, keeps it in the home's disk cache (shared by every
        process) and fetches the chunks after it in the same request."""
        plain = self.store.get(cid)
        if len(plain) != self.manifest.chunk_len(index):
            raise CorruptObject(f"chunk {cid.hex()[:16]}: wrong plaintext length", chunk_id=cid)
        _pwrite_all(self._data_fd, plain, index * self.chunk_size)
        self.state[index] = HYDRATED
        self.hydrations += 1

    def _envelope(self, index: int) -> bytes:
        """The stored envelope of a chunk; looked up again if gc moved it meanwhile."""
        for attempt in range(2):
            number, length = self._where[index] - 1, self._length[index]
            try:
                data = os.pread(self._pack_fd(number), length, self._offset[index])
            except FileNotFoundError:
                if attempt:
                    raise
                loc = self.store.locate(self._ids[index * 32 : index * 32 + 32])
                self._place(index, loc.pack, loc.offset, loc.size)
                continue
            if len(data) != length:
                raise StoreError(f"{self._packs[number]}: short read at {self._offset[index]}")
            return data
        raise AssertionError("unreachable")

    def read(self, offset: int, length: int) -> list[bytes]:
        """The bytes of a range, hydrating what it needs (blocking: worker threads)."""
        self.hydrate(self.chunks(offset, length))
        out: list[Segment] = []
        if not self.segments(offset, length, out):
            raise StoreError("image chunks vanished while being read")
        return [read_segment(s) for s in out]

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.state.release()
            self._map.close()
        for fd in [self._state_fd, self._data_fd, *self._pack_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pack_fds.clear()


def read_segment(segment: Segment) -> bytes:
    """A segment's bytes, blocking (past a file's end reads as zeros)."""
    fd, position, n = segment
    if fd is None:
        return bytes(n)
    data = os.pread(fd, n, position)
    return data if len(data) == n else data.ljust(n, b"\0")


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, position)
        view, position = view[done:], position + done


def _open_state(directory: Path, manifest: Manifest, manifest_id: bytes) -> tuple[int, mmap.mmap]:
    """Open (or create, atomically: a process never sees it half made) the state file."""
    path = directory / f"{manifest_id.hex()}.state"
    size = _HEAD.size + manifest.count
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(_HEAD.pack(MAGIC, VERSION, manifest.chunk_size, manifest.count, manifest_id))
            f.truncate(size)
        try:
            os.link(tmp, path)  # fails if another process made it first: then use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        head = os.pread(fd, _HEAD.size, 0)
        if len(head) != _HEAD.size or os.fstat(fd).st_size != size:
            raise CorruptObject(f"{path}: truncated hydration state")
        magic, version, chunk_size, count, mid = _HEAD.unpack(head)
        if (magic, version, chunk_size, count, mid) != (
            MAGIC,
            VERSION,
            manifest.chunk_size,
            manifest.count,
            manifest_id,
        ):
            raise CorruptObject(f"{path}: not the hydration state of this image version")
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


def _open_data(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_size < size:  # growing never loses what another process wrote
        os.ftruncate(fd, size)
    return fd
