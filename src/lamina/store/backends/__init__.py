"""Where the store's packs live: a local directory by default, an S3 bucket, memory for tests.

base.py     Backend, the one interface
local.py    a local directory: one file per object, atomic by write-fsync-rename
memory.py   in memory, for tests
s3.py       an S3-compatible bucket (boto3): one object per pack, ranged GETs
"""

from lamina.store.backends.base import Backend
from lamina.store.backends.local import LocalBackend
from lamina.store.backends.memory import MemoryBackend

__all__ = ["Backend", "LocalBackend", "MemoryBackend"]
