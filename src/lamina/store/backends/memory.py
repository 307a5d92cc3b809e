"""In-memory backend for tests: same contract as the local one, nothing on disk."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from lamina.errors import StoreBusy
from lamina.store.backends.base import Buffer


class MemoryBackend:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def describe(self) -> str:
        return "memory"

    def put(self, name: str, parts: Sequence[Buffer], *, durable: bool = True) -> None:
        self.objects[name] = b"".join(parts)

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        try:
            data = self.objects[name]
        except KeyError:
            raise FileNotFoundError(name) from None
        return data[offset:] if length < 0 else data[offset : offset + length]

    def size(self, name: str) -> int:
        try:
            return len(self.objects[name])
        except KeyError:
            raise FileNotFoundError(name) from None

    def delete(self, name: str) -> None:
        self.objects.pop(name, None)

    def list(self, prefix: str = "") -> Iterator[str]:
        yield from sorted(n for n in list(self.objects) if n.startswith(prefix))

    @contextmanager
    def lock(self, *, exclusive: bool, timeout: float) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._writer or (exclusive and self._readers):
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    raise StoreBusy("store is busy")
            if exclusive:
                self._writer = True
            else:
                self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._writer = False
                else:
                    self._readers -= 1
                self._cond.notify_all()
