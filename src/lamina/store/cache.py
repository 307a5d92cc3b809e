"""A byte-bounded LRU of decompressed chunks, shared by every reader in a process.

Many machines booting one image version read the same chunks: they share this cache, so
memory depends on the hot set, not on the number of clients.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

DEFAULT_CACHE_BYTES: Final = 512 << 20


class ChunkCache:
    def __init__(self, capacity: int = DEFAULT_CACHE_BYTES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def used(self) -> int:
        return self._bytes

    def contains(self, cid: bytes) -> bool:
        return cid in self._items

    def get(self, cid: bytes, load: Callable[[bytes], bytes]) -> bytes:
        """The cached plaintext of ``cid``, loading (outside the lock) on a miss."""
        with self._lock:
            data = self._items.get(cid)
            if data is not None:
                self._items.move_to_end(cid)
                self.hits += 1
                return data
            self.misses += 1
        data = load(cid)
        self.put(cid, data)
        return data

    def put(self, cid: bytes, data: bytes) -> None:
        with self._lock:
            old = self._items.pop(cid, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[cid] = data
            self._bytes += len(data)
            while self._bytes > self.capacity and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)
