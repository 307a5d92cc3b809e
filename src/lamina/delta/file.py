"""A machine's copy-on-write delta: a block map and a data file, 4 KiB granularity.

    delta.map   4096-byte header (magic b"LMDM", version, block size, image size, base
                manifest id), then one little-endian u32 per block of the image:
                0 = not in the delta (read the image), 0xFFFFFFFF = zeros, n = data slot n-1
    delta.data  slots of one block each, appended as blocks are first written
    lock        flock'ed by whoever has the delta open (the server, a commit, a reset)
    ended       present when the machine's last boot ended cleanly (its writer sent
                NBD_CMD_DISC after its writes were flushed, as qemu does at power-off);
                empty, made durable before the server hangs up, removed when the next
                connection opens the disk (which is then a new boot: a stateless machine's
                delta is dropped first). A server restart or crash leaves no marker, so a
                client that reconnects finds every write it made.

Why this shape (measured against qcow2 overlays, see docs/design.md): a 4 KiB write is one pwrite
into the data file and one 4-byte store into the mmap'ed map - no read of the image, where
a 64 KiB-cluster qcow2 overlay copies 60 KiB of backing data first. The map is written
in place through the mmap, so a ``kill -9`` loses nothing the kernel has accepted; FLUSH
and FUA fdatasync the data before the map, so after a power loss every flushed block
reads back and no map entry points past the data file's end. Slots are never reused (a
trimmed block's slot leaks until reset or commit): appends keep crash reasoning simple.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from lamina.errors import Conflict, CorruptObject
from lamina.files import fsync_dir
from lamina.locks import try_lock

MAGIC: Final = b"LMDM"
VERSION: Final = 1
BLOCK: Final = 4096
HEADER_SIZE: Final = 4096
ZERO: Final = 0xFFFFFFFF
ABSENT: Final = 0
ENDED: Final = "ended"
_HEAD = struct.Struct("<4sBxxxIQ32s")


def _lock(directory: Path) -> int:
    return try_lock(
        directory / "lock", f"delta {directory.name} is in use (is the machine connected?)"
    )


@dataclass(frozen=True, slots=True)
class Run:
    """A run of consecutive blocks of one kind: 'base', 'zero' or 'delta' (with slot)."""

    kind: str
    first: int
    count: int
    slot: int = 0


class Delta:
    """An open delta. Writes from one thread at a time (the device's lock); reads from
    any thread: a slot is filled before the map points at it."""

    def __init__(self, directory: Path, *, size: int, base_id: bytes) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.size = size
        self.blocks = -(-size // BLOCK)
        self._lock_fd = _lock(directory)
        try:
            self._open_files(base_id)
        except BaseException:
            os.close(self._lock_fd)
            raise
        # Writes bump the generation; a flush (on another thread) makes
        # durable what was written up to the generation it saw when it started, so a write
        # that lands during an fdatasync is left for the next FLUSH instead of being taken
        # as covered.
        self._generation = 0
        self._synced = 0
        self._flush_lock = threading.Lock()

    def _open_files(self, base_id: bytes) -> None:
        map_path = self.directory / "delta.map"
        fresh = not map_path.exists() or map_path.stat().st_size == 0
        self._map_fd = os.open(map_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._data_fd = os.open(
            self.directory / "delta.data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        map_len = HEADER_SIZE + 4 * self.blocks
        if fresh:
            os.ftruncate(self._map_fd, map_len)
            os.pwrite(self._map_fd, _HEAD.pack(MAGIC, VERSION, BLOCK, self.size, base_id), 0)
            os.fsync(self._map_fd)
        self._check_header(base_id, map_len)
        self._mm = mmap.mmap(self._map_fd, map_len)
        self.map = memoryview(self._mm)[HEADER_SIZE:].cast("I")
        # Slots past the highest mapped one belong to writes that never reached the map
        # (a crash between the two stores): they are free again.
        self.used_blocks, self._next_slot = _scan(self.map) if not fresh else (0, 0)

    def _check_header(self, base_id: bytes, map_len: int) -> None:
        head = os.pread(self._map_fd, _HEAD.size, 0)
        magic, version, block, size, stored_base = _HEAD.unpack(head)
        if magic != MAGIC or version != VERSION or block != BLOCK:
            raise CorruptObject(f"{self.directory}: not a lamina delta (or a newer version)")
        if size != self.size or stored_base != base_id:
            raise Conflict(f"{self.directory}: delta belongs to another image version")
        if os.fstat(self._map_fd).st_size != map_len:
            raise CorruptObject(f"{self.directory}: map has the wrong length")

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.map.release()
            self._mm.close()
        for fd in (self._map_fd, self._data_fd, self._lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- queries --------------------------------------------------------------------

    def untouched(self, first: int, count: int) -> bool:
        """True when none of these blocks is in the delta (the common, fast case)."""
        if not self.used_blocks:
            return True
        view = self.map[first : first + count]
        return view.tobytes() == bytes(4 * count)

    def runs(self, first: int, count: int) -> Iterator[Run]:
        """The blocks [first, first+count) grouped into runs of one kind."""
        i, end = first, first + count
        while i < end:
            entry = self.map[i]
            j = i + 1
            if entry in (ABSENT, ZERO):
                while j < end and self.map[j] == entry:
                    j += 1
                yield Run("base" if entry == ABSENT else "zero", i, j - i)
            else:
                while j < end and self.map[j] == entry + (j - i):
                    j += 1
                yield Run("delta", i, j - i, entry - 1)
            i = j

    def read_slots(self, slot: int, count: int) -> bytes:
        data = os.pread(self._data_fd, count * BLOCK, slot * BLOCK)
        return data.ljust(count * BLOCK, b"\0")

    def read_slots_cached(self, slot: int, count: int) -> bytearray | None:
        """The slots if the page cache holds all of them, else None: a read that never
        waits for the disk (RWF_NOWAIT), for the event loop."""
        out = bytearray(count * BLOCK)
        try:
            got = os.preadv(self._data_fd, [out], slot * BLOCK, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP):
                return None
            raise
        return out if got == len(out) else None  # short: not all cached, or past the end

    # -- updates --------------------------------------------------------------------

    def write_blocks(self, first: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole blocks starting at block ``first`` (len(data) a multiple of BLOCK,
        except for the image's last, short block)."""
        count = -(-len(data) // BLOCK)
        pos = 0
        for run in self.runs(first, count):
            n = run.count * BLOCK
            part = memoryview(data)[pos : pos + n]
            if run.kind == "delta":
                os.pwrite(self._data_fd, part, run.slot * BLOCK)
            else:
                slot = self._next_slot
                self._next_slot += run.count
                os.pwrite(self._data_fd, part, slot * BLOCK)
                for k in range(run.count):  # data first, then the map
                    self.map[run.first + k] = slot + k + 1
                self.used_blocks += run.count
            pos += n
        self._generation += 1

    def zero_blocks(self, first: int, count: int) -> None:
        for i in range(first, first + count):
            if self.map[i] == ABSENT:
                self.used_blocks += 1
            self.map[i] = ZERO
        self._generation += 1

    def flush(self) -> None:
        """Make every write accepted so far durable: data first, then the map pointing at it."""
        with self._flush_lock:
            target = self._generation
            if target == self._synced:
                return
            os.fdatasync(self._data_fd)
            # The map's pages dirtied through the mmap are the file's dirty pages: an
            # fdatasync writes them as msync(MS_SYNC) does on Linux, but without the
            # GIL (CPython 3.11's mmap.flush keeps it through the msync: 30-60 ms of a
            # worker's event loop stopped by one machine's flush, measured).
            os.fdatasync(self._map_fd)
            self._synced = target


def delta_base(directory: Path) -> bytes | None:
    """The manifest id of the image version a delta was made on (None: no delta there)."""
    try:
        with open(directory / "delta.map", "rb") as f:
            head = f.read(_HEAD.size)
    except FileNotFoundError:
        return None
    if len(head) < _HEAD.size:
        return None
    magic, version, _block, _size, base = _HEAD.unpack(head)
    return bytes(base) if magic == MAGIC and version == VERSION else None


def delta_usage(directory: Path) -> tuple[int, int]:
    """(blocks in the delta, bytes of its data file), without opening it."""
    data = directory / "delta.data"
    mpath = directory / "delta.map"
    if not mpath.exists():
        return 0, 0
    used, _ = _scan(memoryview(mpath.read_bytes()[HEADER_SIZE:]).cast("I"))
    return used, data.stat().st_size if data.exists() else 0


_WINDOW: Final = 16384  # map entries (64 MiB of image) skipped at once when all absent
_EMPTY: Final = bytes(4 * _WINDOW)


def _scan(entries: memoryview) -> tuple[int, int]:
    """(blocks mapped, highest slot in use) of a map (a Python loop over the map took
    0.25 s for a 20 GiB image, on the loop during a handshake). Windows with no entry are
    skipped with one compare; the others become lists, searched in C. A machine that wrote
    20 MiB over the first quarter of a 1 GiB image: 27 ms before, 3 ms (clients reconnect:
    each machine of a storm reopens its delta, on a thread that holds the GIL)."""
    raw = entries.cast("B").tobytes()
    words = memoryview(raw).cast("I")
    used = top = 0
    for start in range(0, len(words), _WINDOW):
        end = min(start + _WINDOW, len(words))
        if raw.startswith(_EMPTY[: 4 * (end - start)], 4 * start):
            continue
        values = words[start:end].tolist()
        used += len(values) - values.count(ABSENT)
        if ZERO in values:
            values = [e for e in values if e != ZERO]
        top = max(top, max(values, default=0))
    return used, top


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[None]:
    """Hold a delta's lock (refused with Conflict while someone has it open)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = _lock(directory)
    try:
        yield
    finally:
        os.close(fd)


def remove_files(directory: Path) -> None:
    """Delete a delta's files; call with its lock held (``exclusive``)."""
    for name in ("delta.map", "delta.data", ENDED):
        (directory / name).unlink(missing_ok=True)


def copy_files(directory: Path, dest: Path) -> list[str]:
    """Copy a delta's files (flushed, and not written meanwhile: the caller holds its lock
    or keeps its writers waiting) into ``dest``, durably; returns the names copied."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("delta.map", "delta.data", ENDED):
        if not (directory / name).exists():
            continue
        shutil.copyfile(directory / name, dest / name)  # copy_file_range: no user-space copy
        fd = os.open(dest / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        copied.append(name)
    fsync_dir(dest)
    return copied


def mark_ended(directory: Path) -> None:
    """Record, durably, that the machine's boot ended cleanly (its writes are flushed)."""
    fd = os.open(directory / ENDED, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)


def begin_boot(directory: Path, *, stateless: bool) -> bool:
    """A connection opens the machine's disk: when its last boot ended cleanly, this is a
    new one, and a stateless machine's delta is dropped. Call with the delta's lock held
    (``exclusive``). True when a delta was dropped."""
    if not (directory / ENDED).exists():
        return False
    dropped = stateless and (directory / "delta.map").exists()
    if stateless:
        for name in ("delta.map", "delta.data"):
            (directory / name).unlink(missing_ok=True)
    # Durable before any write of the new boot: a crash must not find the marker again
    # and take this boot's writes for the last one's.
    (directory / ENDED).unlink()
    fsync_dir(directory)
    return dropped


def discard(directory: Path) -> None:
    """Throw a delta away (reset); refuses while someone has it open."""
    if not directory.exists():
        return
    with exclusive(directory):
        remove_files(directory)
