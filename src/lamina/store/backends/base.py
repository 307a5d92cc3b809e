"""The one interface between the chunk store and where its bytes live."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

Buffer = bytes | bytearray | memoryview


class Backend(Protocol):
    """Named immutable objects (packs), written whole and read by range.

    ``put`` is atomic: a reader sees either no object or all of it, also after a crash of
    the writer. With ``durable`` it returns only once the object survives a power loss.
    Names are relative paths such as ``packs/3f/3f0a....pack``.
    """

    def put(self, name: str, parts: Sequence[Buffer], *, durable: bool = True) -> None:
        """Write the concatenation of ``parts`` as one object."""
        ...

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        """Bytes ``[offset, offset+length)`` of an object (all of it when length < 0).

        Raises FileNotFoundError when the object does not exist.
        """
        ...

    def size(self, name: str) -> int: ...

    def delete(self, name: str) -> None: ...

    def list(self, prefix: str = "") -> Iterator[str]: ...

    def lock(self, *, exclusive: bool, timeout: float) -> AbstractContextManager[None]:
        """A store-wide reader/writer lock shared by every process using this backend."""
        ...

    def describe(self) -> str: ...
