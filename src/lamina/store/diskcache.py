"""A bounded cache of chunk envelopes on the local disk, for stores whose packs are remote,
shared by every process of a home (the block server's workers, a command beside them).

Envelopes are appended to segment files, ``ROOT/NNNNNNNN.seg``, exactly as stored in their
pack: compressed, self-describing (the header holds the id and the length) and checked
against their id by the reader on every use. Only envelopes that passed that check are
written here. A segment is a pack without a trailer, so the map from chunk id to place is
rebuilt by walking the headers, and a tail torn by a crash is cut off there.

Why segments and not a file per chunk: writing 2,049 chunks of 256 KiB as one file each
(write, rename) took 1.8-2.4 s here, appending them to one file 0.24 s.

Sharing between processes:

- Every process maps the segments itself, by walking them when it opens the cache, and
  again (only the bytes added since) when it misses or once a second: what another
  process added is found without a message.
- Whatever changes the files (an append, an eviction, cutting a torn tail) happens under
  an exclusive ``flock`` of ``ROOT/lock``, held for one append (tens of microseconds);
  reads take no lock. An append is one ``pwrite`` at the end of the newest segment, so a
  reader walking a segment meanwhile either sees a whole envelope or stops before it.
- An evicted segment is unlinked; a process that still has it open reads the old bytes
  (still correct, and checked) until it notices the file is gone and lets it go.

Eviction by use, at segment granularity with a second chance (CLOCK): when the files
would exceed ``capacity``, the oldest segment goes, but the entries read since they were
written are first appended again to the newest one. A reader marks an entry used in
``NNNNNNNN.use`` (one byte per entry, by its position in the segment), so a hit in any
process counts. The bound holds at every moment for the segment files present.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from lamina.errors import CorruptObject
from lamina.store import codec

_MIN_SEGMENT: Final = 1 << 20
_MAX_SEGMENT: Final = 64 << 20
# How often a process that only hits looks for what others added or evicted (a scan of
# the folder and an fstat a segment: about 30 us for 16 segments).
_RESYNC: Final = 1.0
_USED: Final = b"\x01"


@dataclass(slots=True)
class _Segment:
    number: int
    fd: int
    size: int = 0  # bytes walked: whole envelopes
    entries: list[tuple[bytes, int, int]] = field(default_factory=list)  # (id, offset, length)
    readers: int = 0
    dead: bool = False
    use_fd: int = -1


@dataclass(slots=True)
class _Place:
    segment: _Segment
    offset: int
    length: int
    ordinal: int  # its position in the segment: its byte in the ``.use`` file
    used: bool = False  # read since written, as far as this process knows


class DiskChunkCache:
    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        # 16 segments in the cache: evicting one drops at most 1/16 of it.
        self.segment_size = min(capacity, max(_MIN_SEGMENT, min(_MAX_SEGMENT, capacity // 16)))
        self._places: dict[bytes, _Place] = {}
        self._segments: OrderedDict[int, _Segment] = OrderedDict()  # oldest first
        self._lock = threading.Lock()  # this process's map
        self._write_lock = threading.Lock()  # one thread of this process under the flock
        self._lock_fd: int | None = None
        self._last = 0  # the highest segment number seen: numbers are never reused
        self._next_sync = 0.0
        self.hits = 0
        self.misses = 0

    @property
    def used(self) -> int:
        """Bytes in the segment files this process knows of (at most ``capacity``)."""
        return sum(s.size for s in self._segments.values())

    def __len__(self) -> int:
        return len(self._places)

    def __contains__(self, cid: bytes) -> bool:
        return cid in self._places

    def _path(self, number: int, suffix: str = ".seg") -> Path:
        return self.root / f"{number:08d}{suffix}"

    # -- reading ----------------------------------------------------------------------------

    def get(self, cid: bytes) -> bytes | None:
        """The cached envelope of ``cid``, or None (the caller checks it against the id)."""
        if not self.claim():
            return None
        now = time.monotonic()
        with self._lock:
            place = self._places.get(cid)
            if place is None or now >= self._next_sync:
                self._sync(trim=False)  # what other processes added (or evicted) meanwhile
                place = self._places.get(cid)
            if place is None:
                self.misses += 1
                return None
            first_use = not place.used
            place.used = True
            place.segment.readers += 1
        try:
            data = os.pread(place.segment.fd, place.length, place.offset)
            if first_use:
                self._mark_used(place)
        finally:
            with self._lock:
                self._release(place.segment)
        self.hits += 1
        return data

    def _mark_used(self, place: _Place) -> None:
        """Tell whichever process evicts this segment that the entry was read."""
        segment = place.segment
        if segment.use_fd < 0:
            try:
                fd = os.open(
                    self._path(segment.number, ".use"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
            except OSError:
                return
            with self._lock:
                if segment.use_fd < 0 and not segment.dead:
                    segment.use_fd, fd = fd, -1
            if fd >= 0:
                os.close(fd)
        with contextlib.suppress(OSError):
            os.pwrite(segment.use_fd, _USED, place.ordinal)

    # -- writing ----------------------------------------------------------------------------

    def put(self, cid: bytes, envelope: bytes) -> None:
        """Keep a verified envelope, evicting by use to stay within the bound."""
        length = len(envelope)
        if not 0 < length <= self.segment_size or not self.claim():
            return
        with self._lock:
            if cid in self._places:
                return
        with self._exclusive():
            with self._lock:
                self._sync(trim=True)
                if cid in self._places:  # another process cached it meanwhile
                    return
                segment = self._reserve(length)
                offset = segment.size
            try:
                written = os.pwrite(segment.fd, envelope, offset) == length
            except OSError:
                written = False  # a full disk, say: the chunk is simply not cached
            with self._lock:
                if written:
                    self._add(segment, cid, offset, length)
                else:  # nothing half-written is left for a walker to stop at
                    with contextlib.suppress(OSError):
                        os.ftruncate(segment.fd, offset)

    def discard(self, cid: bytes) -> None:
        """Forget an entry (one that failed its check, say); its bytes go with its segment."""
        with self._lock:
            self._places.pop(cid, None)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The right to change the files: one thread here, one process of all."""
        assert self._lock_fd is not None
        with self._write_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- with the map's lock held (and the flock, where said) --------------------------------

    def _add(self, segment: _Segment, cid: bytes, offset: int, length: int) -> None:
        self._places[cid] = _Place(segment, offset, length, len(segment.entries))
        segment.entries.append((cid, offset, length))
        segment.size = max(segment.size, offset + length)

    def _reserve(self, length: int) -> _Segment:
        """The segment to append ``length`` bytes to, evicting to make room (flock held)."""
        while self.used + length > self.capacity and self._segments:
            self._evict_oldest()
        if self._segments:
            newest = next(reversed(self._segments.values()))
            if newest.size + length <= self.segment_size:
                return newest
        return self._new_segment()

    def _new_segment(self) -> _Segment:
        while True:
            number = self._last = max(self._last, *self._segments, 0) + 1
            try:
                fd = os.open(
                    self._path(number), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
                )
            except FileExistsError:
                continue  # left by a process that died before its first append: skip it
            segment = self._segments[number] = _Segment(number, fd)
            return segment

    def _evict_oldest(self) -> None:
        """Unlink the oldest segment; the entries read since written (in any process) are
        appended again to the newest (flock held)."""
        _, old = self._segments.popitem(last=False)
        marks = b""
        with contextlib.suppress(OSError):
            marks = self._path(old.number, ".use").read_bytes()
        keep: list[tuple[bytes, bytes]] = []
        for ordinal, (cid, offset, length) in enumerate(old.entries):
            place = self._places.get(cid)
            if place is None or place.segment is not old:
                continue  # a newer copy lives elsewhere
            del self._places[cid]
            if place.used or marks[ordinal : ordinal + 1] == _USED:
                keep.append((cid, os.pread(old.fd, length, offset)))
        for suffix in (".seg", ".use"):
            with contextlib.suppress(FileNotFoundError):
                self._path(old.number, suffix).unlink()
        old.dead = True
        self._release(old, hold=False)
        for cid, envelope in keep:
            if self.used + len(envelope) > self.capacity:
                break  # no room without evicting again: let them go
            segment = self._reserve(len(envelope))
            offset = segment.size
            os.pwrite(segment.fd, envelope, offset)
            self._add(segment, cid, offset, len(envelope))

    def _release(self, segment: _Segment, *, hold: bool = True) -> None:
        if hold:
            segment.readers -= 1
        if segment.dead and segment.readers == 0 and segment.fd >= 0:
            os.close(segment.fd)
            segment.fd = -1
            if segment.use_fd >= 0:
                os.close(segment.use_fd)
                segment.use_fd = -1

    def _sync(self, *, trim: bool) -> None:
        """Follow the folder: segments other processes made or grew, and those they
        evicted. ``trim`` (flock held): cut torn tails, drop stray usage files, and hold
        the bound."""
        self._next_sync = time.monotonic() + _RESYNC
        segments: set[int] = set()
        marks: set[int] = set()
        with os.scandir(self.root) as entries:
            for entry in entries:
                stem, _, suffix = entry.name.partition(".")
                if stem.isdigit() and suffix in ("seg", "use"):
                    (segments if suffix == "seg" else marks).add(int(stem))
        for number in [n for n in self._segments if n not in segments]:
            self._forget(self._segments.pop(number))
        for number in sorted(segments):
            segment = self._segments.get(number) or self._open_segment(number)
            if segment is not None:
                self._walk(segment, trim)
        if trim:
            for number in marks - segments:  # evicted while a reader was marking it
                with contextlib.suppress(FileNotFoundError):
                    self._path(number, ".use").unlink()
            while self.used > self.capacity and self._segments:
                self._evict_oldest()

    def _open_segment(self, number: int) -> _Segment | None:
        try:
            fd = os.open(self._path(number), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # evicted meanwhile
        segment = _Segment(number, fd)
        self._segments[number] = segment
        self._segments = OrderedDict(sorted(self._segments.items()))
        self._last = max(self._last, number)
        return segment

    def _forget(self, segment: _Segment) -> None:
        """A segment another process evicted: its entries go from this map."""
        for cid, _, _ in segment.entries:
            place = self._places.get(cid)
            if place is not None and place.segment is segment:
                del self._places[cid]
        segment.dead = True
        self._release(segment, hold=False)

    def _walk(self, segment: _Segment, trim: bool) -> None:
        """Map the envelopes appended since the last walk, from their headers. A tail
        that does not parse is a write cut short by a crash (``trim``: cut it off) or,
        without the flock, an append in progress (left for the next walk)."""
        end = os.fstat(segment.fd).st_size
        offset = segment.size
        while offset + codec.HEADER_SIZE <= end:
            try:
                head = codec.parse_header(os.pread(segment.fd, codec.HEADER_SIZE, offset))
            except CorruptObject:
                break
            if offset + head.size > end:
                break
            # a later copy (moved by a second chance) wins over an earlier one
            self._add(segment, head.chunk_id, offset, head.size)
            offset += head.size
        if trim and offset < end:
            os.ftruncate(segment.fd, offset)

    # -- opening ----------------------------------------------------------------------------

    def claim(self) -> bool:
        """Open the cache (mapping what is on disk) unless it is turned off. Every process
        of the home may: the block server's workers all read and add to one cache."""
        if self._lock_fd is not None:
            return True
        if self.capacity <= 0:
            return False
        with self._write_lock:
            if self._lock_fd is not None:
                return True
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                with self._lock:
                    self._sync(trim=True)  # and trims to this process's bound
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._lock_fd = fd
        return True

    def close(self) -> None:
        with self._lock:
            for segment in self._segments.values():
                segment.dead = True
                self._release(segment, hold=False)
            self._segments.clear()
            self._places.clear()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
