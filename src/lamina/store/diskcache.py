"""A bounded cache of chunk envelopes on the local disk, for stores whose packs are remote.

One file per chunk, ``ROOT/ab/abcdef....env``, holding the envelope exactly as stored in
its pack (compressed, self-describing, checked against its id by the reader on every use).
Only envelopes that passed that check are ever written here.

One process at a time owns the cache (an exclusive ``flock`` on ``ROOT/lock``): the first
that wants to add to it, normally the block server. The owner keeps the entries in use
order and evicts the least recently used when the files would exceed ``capacity``; others
read hits but add nothing, so the bound holds with any number of processes. Use order
survives a restart through the files' mtimes, which the owner sets on each hit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Final

_BLOCK: Final = 4096
# A process that could not take the cache retries no more often than this.
_CLAIM_RETRY: Final = 5.0


def _footprint(size: int) -> int:
    """Bytes a file of ``size`` takes on disk (whole blocks)."""
    return -(-size // _BLOCK) * _BLOCK


class DiskChunkCache:
    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # id -> footprint, LRU first
        self._used = 0
        self._lock = threading.Lock()
        self._owner_fd: int | None = None
        self._next_claim = 0.0
        self.hits = 0
        self.misses = 0

    @property
    def used(self) -> int:
        """Bytes on disk of the entries this process knows (all of them when it owns)."""
        return self._used

    @property
    def owner(self) -> bool:
        return self._owner_fd is not None

    def __len__(self) -> int:
        return len(self._entries)

    def _path(self, cid: bytes) -> Path:
        name = cid.hex()
        return self.root / name[:2] / f"{name}.env"

    def get(self, cid: bytes) -> bytes | None:
        """The cached envelope of ``cid``, or None (the caller checks it against the id)."""
        path = self._path(cid)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.misses += 1
            return None
        self.hits += 1
        if self.owner:
            with self._lock:
                if cid in self._entries:
                    self._entries.move_to_end(cid)
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)  # use order for the next owner
        return data

    def put(self, cid: bytes, envelope: bytes) -> None:
        """Keep a verified envelope, evicting the least recently used to stay in bounds."""
        size = _footprint(len(envelope))
        if size > self.capacity or not self._claim():
            return
        path = self._path(cid)
        with self._lock:
            if cid in self._entries:
                return
            victims = self._evict(self._used + size - self.capacity)
            self._entries[cid] = size
            self._used += size
        for victim in victims:
            with contextlib.suppress(FileNotFoundError):
                self._path(victim).unlink()
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(envelope)
            os.replace(tmp, path)  # no fsync: a torn file after a crash fails its check
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.discard(cid)

    def discard(self, cid: bytes) -> None:
        """Forget an entry (one that failed its check, say)."""
        with self._lock:
            size = self._entries.pop(cid, None)
            if size is not None:
                self._used -= size
        with contextlib.suppress(FileNotFoundError):
            self._path(cid).unlink()

    def _evict(self, excess: int) -> list[bytes]:
        """Drop least recently used entries worth ``excess`` bytes (lock held)."""
        victims: list[bytes] = []
        while excess > 0 and self._entries:
            victim, size = self._entries.popitem(last=False)
            self._used -= size
            excess -= size
            victims.append(victim)
        return victims

    def _claim(self) -> bool:
        """Own the cache if nobody else does (tried again every few seconds)."""
        if self._owner_fd is not None:
            return True
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
            self._scan()
            self._owner_fd = fd
        return True

    def _scan(self) -> None:
        """Load what a previous owner left, oldest use first; trim it to the bound."""
        found: list[tuple[float, bytes, int]] = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.startswith("."):  # a temporary of a killed owner
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    continue
                try:
                    st = entry.stat()
                    cid = bytes.fromhex(entry.name.removesuffix(".env"))
                except (OSError, ValueError):
                    continue
                found.append((st.st_mtime, cid, _footprint(st.st_size)))
        found.sort()
        self._entries = OrderedDict((cid, size) for _mtime, cid, size in found)
        self._used = sum(size for _m, _c, size in found)
        for victim in self._evict(self._used - self.capacity):
            with contextlib.suppress(FileNotFoundError):
                self._path(victim).unlink()

    def close(self) -> None:
        with self._lock:
            if self._owner_fd is not None:
                os.close(self._owner_fd)
                self._owner_fd = None
