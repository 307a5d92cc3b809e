"""Where the store's packs live: a local directory by default, memory for tests.

base.py     Backend, the one interface
local.py    a local directory: one file per object, atomic by write-fsync-rename
memory.py   in memory, for tests
"""

from lamina.store.backends.base import Backend
from lamina.store.backends.local import LocalBackend
from lamina.store.backends.memory import MemoryBackend

__all__ = ["Backend", "LocalBackend", "MemoryBackend"]
