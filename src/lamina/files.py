"""Small files replaced whole: a reader sees the old content or the new, never a mix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (temporary file, rename), with exactly ``mode``;
    ``durable`` also syncs the file and its directory, so it survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.chmod(tmp, mode)  # whatever the umask
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(
    path: Path, data: dict[str, Any], mode: int = 0o644, *, durable: bool = True
) -> None:
    write_atomic(path, json.dumps(data, indent=1), mode=mode, durable=durable)
