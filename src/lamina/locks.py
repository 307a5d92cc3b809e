"""Exclusive ``flock`` locks on lock files: taken at once or refused, or waited for."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lamina.errors import Conflict


def _open(path: Path, mode: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)


def try_lock(path: Path, busy: str, *, mode: int = 0o644) -> int:
    """Take ``path``'s lock without waiting; ``Conflict(busy)`` while someone holds it.
    Returns the descriptor: closing it releases the lock."""
    fd = _open(path, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise Conflict(busy) from None
        raise
    return fd


@contextmanager
def locked(path: Path, *, mode: int = 0o600) -> Iterator[None]:
    """Hold ``path``'s lock for the block, waiting for it if need be."""
    fd = _open(path, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
