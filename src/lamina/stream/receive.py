"""The manager's side of a sync: staged uploads applied to a machine's delta, once.

    HOME/stream-uploads/MACHINE/UPLOAD_ID/
        blob        the delta blob as received so far (parts written at their offsets)
        applying    present: the blob is complete and checked, and the apply is committed
        applied     present: done (what was applied, as JSON)

An upload changes nothing until its blob is complete, verified (BLAKE3 over the whole
blob) and meant for the machine's pinned image version. Then, holding the delta's lock,
``applying`` is written and fsynced - the commit point - and the runs are written into
the delta. A crash after the commit point is finished by ``recover`` (run before a
machine's delta is opened) by applying again: applying a blob twice gives the same
delta. A retried apply of a finished upload answers as the first did.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from lamina.errors import Conflict, CorruptObject, InvalidInput, NotFound
from lamina.home import Home
from lamina.serve.delta import Delta
from lamina.stream import transfer
from lamina.stream.deltas import apply_runs, write_blob

_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


def uploads_dir(home: Home, machine: str) -> Path:
    return home.root / "stream-uploads" / machine


def _dir(home: Home, machine: str, upload_id: str) -> Path:
    if not _UPLOAD_ID.match(upload_id):
        raise InvalidInput("upload ids are 32 lowercase hex digits")
    return uploads_dir(home, machine) / upload_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _touch(path: Path, text: str = "") -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def state(home: Home, machine: str, upload_id: str) -> dict[str, Any]:
    d = _dir(home, machine, upload_id)
    if (d / "applied").exists():
        return {"received": 0, "applied": True, **json.loads((d / "applied").read_text() or "{}")}
    blob = d / "blob"
    return {"received": blob.stat().st_size if blob.exists() else 0, "applied": False}


def receive(home: Home, machine: str, upload_id: str, offset: int, data: bytes) -> int:
    """Write one part at ``offset`` (which must not leave a gap); returns bytes held."""
    d = _dir(home, machine, upload_id)
    if (d / "applied").exists() or (d / "applying").exists():
        raise Conflict(f"upload {upload_id} is already applied")
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "blob", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        if offset < 0 or offset > size:
            raise Conflict(f"upload {upload_id} holds {size} bytes: send from offset {size}")
        os.pwrite(fd, data, offset)
        return max(size, offset + len(data))
    finally:
        os.close(fd)


def _apply_blob(delta: Delta, blob_path: Path) -> int:
    return apply_runs(delta, transfer.decode(transfer.map_file(blob_path)).runs)


def apply(
    home: Home,
    machine: str,
    upload_id: str,
    *,
    size: int,
    digest: str,
    base_id: bytes,
    image_size: int,
) -> dict[str, Any]:
    d = _dir(home, machine, upload_id)
    if (d / "applied").exists():
        return state(home, machine, upload_id)
    blob_path = d / "blob"
    if not (d / "applying").exists():
        if not blob_path.exists():
            raise NotFound(f"no upload {upload_id} for machine {machine}")
        held = blob_path.stat().st_size
        if held != size:
            raise Conflict(f"upload {upload_id} holds {held} of {size} bytes")
        _check(blob_path, digest, base_id, image_size)
    # The delta's lock first: while the machine is connected nothing is committed.
    delta = Delta(home.deltas_dir / machine, size=image_size, base_id=base_id)
    try:
        if not (d / "applying").exists():
            with open(blob_path, "rb+") as f:
                os.fsync(f.fileno())
            _touch(d / "applying")  # the commit point
        blocks = _apply_blob(delta, blob_path)
        result = {"blocks": blocks, "bytes": blob_path.stat().st_size, "at": time.time()}
        _touch(d / "applied", json.dumps(result))
    finally:
        delta.close()
    blob_path.unlink(missing_ok=True)
    (d / "applying").unlink(missing_ok=True)
    return {"received": 0, "applied": True, **result}


def _check(blob_path: Path, digest: str, base_id: bytes, image_size: int) -> None:
    view = transfer.map_file(blob_path)
    if transfer.digest(view).hex() != digest:
        raise InvalidInput("upload does not end with the digest given")
    try:
        blob = transfer.decode(view)
    except CorruptObject as exc:
        raise InvalidInput(f"upload is not a valid delta blob: {exc}") from None
    if blob.base_id != base_id or blob.size != image_size:
        raise Conflict("upload was made for another image version of this machine")


def recover(home: Home, machine: str) -> int:
    """Finish applies a crash interrupted after their commit point; returns how many."""
    root = uploads_dir(home, machine)
    if not root.exists():
        return 0
    done = 0
    for d in sorted(root.iterdir()):
        if (d / "applying").exists() and not (d / "applied").exists():
            with open(d / "blob", "rb") as f:
                head = f.read(64)
            size, base_id = int.from_bytes(head[16:24], "little"), head[24:56]
            delta = Delta(home.deltas_dir / machine, size=size, base_id=base_id)
            try:
                blocks = _apply_blob(delta, d / "blob")
                _touch(d / "applied", json.dumps({"blocks": blocks, "at": time.time()}))
            finally:
                delta.close()
            (d / "blob").unlink(missing_ok=True)
            (d / "applying").unlink(missing_ok=True)
            done += 1
    return done


def export(home: Home, machine: str, base_id: bytes, image_size: int, dest: Path) -> None:
    """A machine's delta as a blob at ``dest`` (an empty blob when it has none)."""
    directory = home.deltas_dir / machine
    if not (directory / "delta.map").exists():
        dest.write_bytes(transfer.encode(image_size, base_id, []))
        return
    delta = Delta(directory, size=image_size, base_id=base_id)
    try:
        write_blob(delta, base_id, dest)
    finally:
        delta.close()


def forget(home: Home, machine: str) -> None:
    """Drop a machine's staged uploads (the machine is gone or was reset)."""
    root = uploads_dir(home, machine)
    with contextlib.suppress(FileNotFoundError):
        for d in root.iterdir():
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
        root.rmdir()
