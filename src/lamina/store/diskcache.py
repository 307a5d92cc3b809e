"""A bounded cache of chunk envelopes on the local disk, for stores whose packs are remote.

Envelopes are appended to segment files, ``ROOT/NNNNNNNN.seg``, exactly as stored in their
pack: compressed, self-describing (the header holds the id and the length) and checked
against their id by the reader on every use. Only envelopes that passed that check are
written here. A segment is a pack without a trailer, so the map from chunk id to place is
rebuilt by walking the headers, and a tail torn by a crash is cut off there.

Why segments and not a file per chunk: writing 2,049 chunks of 256 KiB as one file each
(write, rename) took 1.8-2.4 s here, appending them to one file 0.24 s.

Eviction by use, at segment granularity with a second chance (CLOCK): when the files
would exceed ``capacity``, the oldest segment goes, but the entries read since they were
written are first appended again to the newest one. The bound holds at every moment
(the total of the segment files' sizes).

One process at a time owns the cache (an exclusive ``flock`` on ``ROOT/lock``): the first
that wants to add to it, normally the block server; it alone reads and writes it. Others
go to the object store (they try to take over every few seconds).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from lamina.errors import CorruptObject
from lamina.store import codec

# A process that could not take the cache retries no more often than this.
_CLAIM_RETRY: Final = 5.0
_MIN_SEGMENT: Final = 1 << 20
_MAX_SEGMENT: Final = 64 << 20


@dataclass(slots=True)
class _Segment:
    number: int
    fd: int
    size: int = 0  # bytes written or reserved
    ids: list[bytes] = field(default_factory=list)
    readers: int = 0
    dead: bool = False


@dataclass(slots=True)
class _Place:
    segment: _Segment
    offset: int
    length: int
    used: bool = False  # read since written: kept on eviction (second chance)


class DiskChunkCache:
    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        # 16 segments in the cache: evicting one drops at most 1/16 of it.
        self.segment_size = min(capacity, max(_MIN_SEGMENT, min(_MAX_SEGMENT, capacity // 16)))
        self._places: dict[bytes, _Place] = {}
        self._writing: set[bytes] = set()
        self._segments: OrderedDict[int, _Segment] = OrderedDict()  # oldest first
        self._used = 0
        self._lock = threading.Lock()
        self._owner_fd: int | None = None
        self._last = 0  # the highest segment number used: numbers are never reused
        self._next_claim = 0.0
        self.hits = 0
        self.misses = 0

    @property
    def used(self) -> int:
        """Bytes in segment files (at most ``capacity``)."""
        return self._used

    @property
    def owner(self) -> bool:
        return self._owner_fd is not None

    def __len__(self) -> int:
        return len(self._places)

    def __contains__(self, cid: bytes) -> bool:
        return cid in self._places

    def _path(self, number: int) -> Path:
        return self.root / f"{number:08d}.seg"

    def get(self, cid: bytes) -> bytes | None:
        """The cached envelope of ``cid``, or None (the caller checks it against the id)."""
        if self._owner_fd is None and not self._claim():
            return None
        with self._lock:
            place = self._places.get(cid)
            if place is None:
                self.misses += 1
                return None
            place.used = True
            place.segment.readers += 1
        try:
            data = os.pread(place.segment.fd, place.length, place.offset)
        finally:
            with self._lock:
                self._release(place.segment)
        self.hits += 1
        return data

    def put(self, cid: bytes, envelope: bytes) -> None:
        """Keep a verified envelope, evicting by use to stay within the bound."""
        length = len(envelope)
        if not 0 < length <= self.segment_size or not self._claim():
            return
        with self._lock:
            if cid in self._places or cid in self._writing:
                return
            segment, offset = self._reserve(length)
            segment.readers += 1  # not closed under the write by an eviction
            self._writing.add(cid)
        try:
            os.pwrite(segment.fd, envelope, offset)
            written = True
        except OSError:
            written = False  # a full disk, say: the chunk is simply not cached
        with self._lock:
            self._writing.discard(cid)
            if written and not segment.dead:  # published only once whole
                self._places[cid] = _Place(segment, offset, length)
                segment.ids.append(cid)
            self._release(segment)

    def discard(self, cid: bytes) -> None:
        """Forget an entry (one that failed its check, say); its bytes go with its segment."""
        with self._lock:
            self._places.pop(cid, None)

    # -- with the lock held -----------------------------------------------------------------

    def _reserve(self, length: int) -> tuple[_Segment, int]:
        """Room for ``length`` bytes at the end of the newest segment, evicting to make it."""
        while self._used + length > self.capacity and self._segments:
            self._evict_oldest()
        segment = self._active(length)
        offset = segment.size
        segment.size += length
        self._used += length
        return segment, offset

    def _active(self, length: int) -> _Segment:
        """The newest segment, or a new one when ``length`` more would overfill it."""
        if self._segments:
            newest = next(reversed(self._segments.values()))
            if newest.size + length <= self.segment_size:
                return newest
        number = max(self._segments, default=self._last) + 1
        self._last = number
        fd = os.open(self._path(number), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
        segment = self._segments[number] = _Segment(number, fd)
        return segment

    def _evict_oldest(self) -> None:
        """Drop the oldest segment; its entries read since written move to the newest."""
        _, old = self._segments.popitem(last=False)
        self._used -= old.size
        keep: list[tuple[bytes, bytes]] = []
        for cid in old.ids:
            place = self._places.get(cid)
            if place is None or place.segment is not old:
                continue
            del self._places[cid]
            if place.used:
                keep.append((cid, os.pread(old.fd, place.length, place.offset)))
        old.dead = True
        self._release(old, hold=False)
        with contextlib.suppress(FileNotFoundError):
            self._path(old.number).unlink()
        for cid, envelope in keep:
            if self._used + len(envelope) > self.capacity:
                break  # no room without evicting again: let them go
            segment, offset = self._reserve(len(envelope))
            os.pwrite(segment.fd, envelope, offset)
            self._places[cid] = _Place(segment, offset, len(envelope))
            segment.ids.append(cid)

    def _release(self, segment: _Segment, *, hold: bool = True) -> None:
        if hold:
            segment.readers -= 1
        if segment.dead and segment.readers == 0 and segment.fd >= 0:
            os.close(segment.fd)
            segment.fd = -1

    # -- ownership ---------------------------------------------------------------------------

    def _claim(self) -> bool:
        """Own the cache if nobody else does (tried again every few seconds)."""
        if self._owner_fd is not None:
            return True
        if self.capacity <= 0:
            return False  # turned off: leave the cache to a process that uses one
        now = time.monotonic()
        with self._lock:
            if self._owner_fd is not None:
                return True
            if now < self._next_claim:
                return False
            self._next_claim = now + _CLAIM_RETRY
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            self._load()
            self._owner_fd = fd
        return True

    def claim(self) -> bool:
        """Take the cache now if it is free (a block server does so at start)."""
        self._next_claim = 0.0
        return self._claim()

    def _load(self) -> None:
        """Map what a previous owner left, oldest first, then trim to the bound."""
        for path in sorted(self.root.glob("*.seg")):
            try:
                number = int(path.stem)
            except ValueError:
                continue
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            segment = self._segments[number] = _Segment(number, fd)
            self._last = max(self._last, number)
            self._walk(segment)
            self._used += segment.size
        while self._used > self.capacity and self._segments:
            self._evict_oldest()

    def _walk(self, segment: _Segment) -> None:
        """Index a segment's envelopes from their headers; cut a torn or garbled tail."""
        end = os.fstat(segment.fd).st_size
        offset = 0
        while offset + codec.HEADER_SIZE <= end:
            try:
                head = codec.parse_header(os.pread(segment.fd, codec.HEADER_SIZE, offset))
            except CorruptObject:
                break
            if offset + head.size > end:
                break
            # a later copy (moved by a second chance) wins over an earlier one
            self._places[head.chunk_id] = _Place(segment, offset, head.size)
            segment.ids.append(head.chunk_id)
            offset += head.size
        if offset < end:
            os.ftruncate(segment.fd, offset)
        segment.size = offset

    def close(self) -> None:
        with self._lock:
            for segment in self._segments.values():
                segment.dead = True
                self._release(segment, hold=False)
            self._segments.clear()
            self._places.clear()
            self._used = 0
            if self._owner_fd is not None:
                os.close(self._owner_fd)
                self._owner_fd = None
