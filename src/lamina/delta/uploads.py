"""The manager's side of a sync: staged uploads applied to a machine's delta, once.

    HOME/stream-uploads/MACHINE/
        lock            flock'ed while the machine's uploads change (see ``_locked``)
        UPLOAD_ID/
            blob        the delta blob as received so far (parts written at their offsets)
            applying    present: the blob is complete and checked, and the apply is committed
            applied     present: done (what was applied, as JSON)

An upload changes nothing until its blob is complete, verified (BLAKE3 over the whole
blob) and meant for the machine's pinned image version. Then, holding the delta's lock,
``applying`` is written and fsynced - the commit point - and the runs are written into
the delta. A crash after the commit point is finished by ``recover`` (run before a
machine's delta is opened) by applying again: applying a blob twice gives the same
delta. A retried apply of a finished upload answers as the first did.

Staged uploads belong to the machine's current delta: ``forget`` drops them all when the
machine is removed, reset or re-pinned (or turned stateless), so that none is applied
later to a delta it was not made for. Limits, since any machine token may start uploads:
only stateful machines upload (the router refuses the others); a machine has at most
``MAX_OPEN`` unfinished uploads, each at most ``transfer.max_size`` of its image (the
largest blob a delta of it makes); an unfinished upload untouched for ``ABANDONED_AFTER``
is dropped when the machine starts another; the records of the last ``KEEP_APPLIED``
finished uploads are kept, so that a sync retried after a lost answer is told it went
through.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from lamina.delta import transfer
from lamina.delta.convert import apply_runs, read_blob, write_blob
from lamina.delta.file import Delta, discard
from lamina.errors import Conflict, CorruptObject, InvalidInput, NotFound
from lamina.files import write_atomic
from lamina.home import Home

_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
# A sync has one upload under way; a few more cover caches lost or recreated mid-sync.
MAX_OPEN: Final = 4
ABANDONED_AFTER: Final = 24 * 3600.0
KEEP_APPLIED: Final = 16
LOCK: Final = "lock"


class TooLarge(InvalidInput):
    """An upload would grow past the largest blob its machine's delta can make."""


def uploads_dir(home: Home, machine: str) -> Path:
    return home.root / "stream-uploads" / machine


def _dir(home: Home, machine: str, upload_id: str) -> Path:
    if not _UPLOAD_ID.fullmatch(upload_id):
        raise InvalidInput("upload ids are 32 lowercase hex digits")
    return uploads_dir(home, machine) / upload_id


@contextlib.contextmanager
def _locked(home: Home, machine: str) -> Iterator[Path]:
    """Hold the machine's uploads lock (creating its directory); yields the directory.

    ``forget`` removes the directory, lock file included, while holding the lock: whoever
    waited on that file then holds a lock nobody else will take, so the lock is taken
    again until the file locked is the one in place."""
    root = uploads_dir(home, machine)
    while True:
        root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue  # removed between mkdir and open
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(root / LOCK)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield root
    finally:
        os.close(fd)


def _uploads(root: Path) -> Iterator[Path]:
    for d in root.iterdir():
        if _UPLOAD_ID.fullmatch(d.name) and d.is_dir():
            yield d


def _expire(root: Path, now: float) -> None:
    """Drop unfinished uploads untouched for ABANDONED_AFTER and all but the newest
    KEEP_APPLIED records of finished ones (call with the lock held). A committed apply
    (``applying``) stays: ``recover`` finishes it."""
    finished: list[tuple[float, Path]] = []
    for d in _uploads(root):
        if (d / "applying").exists():
            continue
        if (d / "applied").exists():
            finished.append(((d / "applied").stat().st_mtime, d))
            continue
        blob = d / "blob"
        touched = (blob if blob.exists() else d).stat().st_mtime
        if now - touched > ABANDONED_AFTER:
            shutil.rmtree(d, ignore_errors=True)
    finished.sort()
    for _, d in finished[: max(0, len(finished) - KEEP_APPLIED)]:
        shutil.rmtree(d, ignore_errors=True)


def _open_count(root: Path) -> int:
    return sum(
        1 for d in _uploads(root) if not (d / "applied").exists() and not (d / "applying").exists()
    )


def state(home: Home, machine: str, upload_id: str) -> dict[str, Any]:
    d = _dir(home, machine, upload_id)
    if (d / "applied").exists():
        return {"received": 0, "applied": True, **json.loads((d / "applied").read_text() or "{}")}
    blob = d / "blob"
    return {"received": blob.stat().st_size if blob.exists() else 0, "applied": False}


def receive(
    home: Home, machine: str, upload_id: str, offset: int, data: bytes, *, image_size: int
) -> int:
    """Write one part at ``offset`` (which must not leave a gap); returns bytes held.
    ``image_size`` (of the machine's image) bounds the blob."""
    d = _dir(home, machine, upload_id)
    most = transfer.max_size(image_size)
    if offset + len(data) > most:
        raise TooLarge(f"upload {upload_id} would pass {most} bytes, the largest delta blob")
    with _locked(home, machine) as root:
        if (d / "applied").exists() or (d / "applying").exists():
            raise Conflict(f"upload {upload_id} is already applied")
        if not d.exists():
            _expire(root, time.time())
            if _open_count(root) >= MAX_OPEN:
                raise Conflict(
                    f"machine {machine} has {MAX_OPEN} unfinished uploads: finish one (sync"
                    " again) or wait for them to expire"
                )
            d.mkdir()
        fd = os.open(d / "blob", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if offset < 0 or offset > size:
                raise Conflict(f"upload {upload_id} holds {size} bytes: send from offset {size}")
            os.pwrite(fd, data, offset)
            return max(size, offset + len(data))
        finally:
            os.close(fd)


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
    if not d.exists():
        raise NotFound(f"no upload {upload_id} for machine {machine}")
    # The uploads lock for the whole apply: ``forget`` (a reset, a re-pin) waits for it
    # rather than removing an upload between its checks and its commit point.
    with _locked(home, machine):
        if (d / "applied").exists():
            return state(home, machine, upload_id)
        blob_path = d / "blob"
        committed = (d / "applying").exists()
        if committed:
            blob = read_blob(blob_path)
        else:
            if not blob_path.exists():
                raise NotFound(f"no upload {upload_id} for machine {machine}")
            held = blob_path.stat().st_size
            if held != size:
                raise Conflict(f"upload {upload_id} holds {held} of {size} bytes")
            blob = _check(blob_path, digest, base_id, image_size)
        # The delta's lock first: while the machine is connected nothing is committed.
        delta = Delta(home.deltas_dir / machine, size=image_size, base_id=base_id)
        try:
            if not committed:
                with open(blob_path, "rb+") as f:
                    os.fsync(f.fileno())
                write_atomic(d / "applying", "")  # the commit point
            blocks = apply_runs(delta, blob.runs)
            result = {"blocks": blocks, "bytes": blob_path.stat().st_size, "at": time.time()}
            write_atomic(d / "applied", json.dumps(result))
        finally:
            delta.close()
        blob_path.unlink(missing_ok=True)
        (d / "applying").unlink(missing_ok=True)
    return {"received": 0, "applied": True, **result}


def _check(blob_path: Path, digest: str, base_id: bytes, image_size: int) -> transfer.Blob:
    """The blob, decoded once it is known to be complete, intact and for this version."""
    view = transfer.map_file(blob_path)
    if transfer.digest(view).hex() != digest:
        raise InvalidInput("upload does not end with the digest given")
    try:
        blob = transfer.decode(view)
    except CorruptObject as exc:
        raise InvalidInput(f"upload is not a valid delta blob: {exc}") from None
    if blob.base_id != base_id or blob.size != image_size:
        raise Conflict("upload was made for another image version of this machine")
    return blob


def _interrupted(root: Path) -> list[Path]:
    return sorted(
        d for d in _uploads(root) if (d / "applying").exists() and not (d / "applied").exists()
    )


def recover(home: Home, machine: str) -> int:
    """Finish applies a crash interrupted after their commit point; returns how many."""
    root = uploads_dir(home, machine)
    # Looked at without the lock first: there is rarely anything to do, and this runs
    # whenever the machine's delta is opened.
    if not root.exists() or not _interrupted(root):
        return 0
    done = 0
    with _locked(home, machine):
        for d in _interrupted(root):
            blob = read_blob(d / "blob")
            delta = Delta(home.deltas_dir / machine, size=blob.size, base_id=blob.base_id)
            try:
                blocks = apply_runs(delta, blob.runs)
                write_atomic(d / "applied", json.dumps({"blocks": blocks, "at": time.time()}))
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


def forget(home: Home, machine: str) -> int:
    """Drop all a machine's staged uploads, finished, unfinished or committed: they were
    made for the delta it had, which is gone (the machine was removed, reset, re-pinned
    or made stateless) and must not reach its next one. Returns how many there were.

    Call it after the delta was discarded: an apply holds the delta open, so the discard
    is refused while one runs, and one starting in between finishes before this (both
    hold the uploads lock)."""
    root = uploads_dir(home, machine)
    if not root.exists():
        return 0
    with _locked(home, machine):
        count = sum(1 for _ in _uploads(root))
        shutil.rmtree(root)  # the lock file too: see _locked
    return count


def discard_delta(home: Home, machine: str) -> None:
    """Throw a machine's delta away (refused while its disk is open) and, with it, the
    uploads staged for that delta."""
    discard(home.deltas_dir / machine)
    forget(home, machine)
