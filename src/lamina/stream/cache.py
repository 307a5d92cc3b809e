"""The cache directory of one streamed image version (I/O around ``index.CacheIndex``).

DIR/config.json   what is streamed: manager URL, image, version, manifest id, machine,
                  mode, token (the file is 0600: the token resumes hydration offline)
DIR/manifest      the version's manifest, checked against its id on every open
DIR/data          the image's plaintext, sparse: chunk i at i * chunk_size
DIR/index         which chunks of ``data`` hold verified, durable bytes (index.py)
DIR/deltas/       a machine's local writes (stack.py)
DIR/lock          flock'ed by the running endpoint
DIR/status.json   figures the running endpoint refreshes every second
DIR/ca-cert.pem   the CA an https:// manager is checked against (``--ca``), if given
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from lamina.errors import CorruptObject, NotFound
from lamina.files import write_atomic, write_json_atomic
from lamina.image import Manifest
from lamina.locks import try_lock
from lamina.store import codec
from lamina.stream import index as idx
from lamina.stream.index import CacheIndex, mark_runs

CONFIG_FORMAT: Final = "lamina-stream"
CONFIG_VERSION: Final = 1


@dataclass(frozen=True)
class StreamConfig:
    url: str
    image: str
    version: int
    manifest_id: bytes
    size: int
    chunk_size: int
    token: str
    machine: str | None = None
    mode: str | None = None  # stateless | stateful, for a machine
    delta_fetched: bool = False  # a stateful machine's manager-side delta is in deltas/synced

    def to_json(self) -> dict[str, Any]:
        fields = asdict(self) | {"manifest_id": self.manifest_id.hex()}
        return {"format": CONFIG_FORMAT, "version_of_format": CONFIG_VERSION, **fields}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamConfig:
        if data.get("format") != CONFIG_FORMAT or data.get("version_of_format") != CONFIG_VERSION:
            raise CorruptObject("stream cache: unknown config format")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        try:
            fields["manifest_id"] = bytes.fromhex(fields["manifest_id"])
        except (KeyError, TypeError, ValueError):
            raise CorruptObject("stream cache: config without a manifest id") from None
        return cls(**fields)


def read_config(root: Path) -> StreamConfig:
    path = root / "config.json"
    if not path.exists():
        raise NotFound(f"{root}: not a stream cache (no config.json)")
    return StreamConfig.from_json(json.loads(path.read_text()))


def lock_dir(root: Path) -> int:
    """Take the cache's exclusive lock (one endpoint per cache); returns the fd."""
    return try_lock(root / "lock", f"{root}: a stream endpoint is already running on this cache")


def is_locked(root: Path) -> bool:
    """True while an endpoint holds the cache."""
    try:
        fd = os.open(root / "lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def create(root: Path, config: StreamConfig, manifest_bytes: bytes) -> None:
    """Lay out a new cache (the caller holds the lock). The manifest must match its id."""
    if codec.chunk_id(manifest_bytes) != config.manifest_id:
        raise CorruptObject("manifest from the manager does not match its id")
    manifest = Manifest.from_bytes(manifest_bytes)
    (root / "manifest").write_bytes(manifest_bytes)
    with open(root / "data", "wb") as f:
        f.truncate(manifest.size)
    with open(root / "index", "wb") as f:
        f.write(idx.header(manifest, config.manifest_id))
        f.truncate(idx.HEADER_SIZE + manifest.count)
        os.fsync(f.fileno())
    # The config goes last: a cache without one is incomplete and is laid out again.
    write_json_atomic(root / "config.json", config.to_json(), mode=0o600)


CA_FILE = "ca-cert.pem"


def ca_file(root: Path) -> Path | None:
    """The CA kept with the cache (from ``--ca``), if any."""
    path = root / CA_FILE
    return path if path.exists() else None


def keep_ca(root: Path, ca: Path | None) -> None:
    """Keep ``--ca``'s certificate with the cache, so a restart (offline, or from a
    ``stream sync``) checks the manager the same way."""
    from lamina.trust.contexts import ca_file as given

    path = given(ca) if ca is not None else None
    if path is not None:
        write_atomic(root / CA_FILE, path.read_bytes(), mode=0o644)


def update_config(root: Path, config: StreamConfig) -> None:
    write_json_atomic(root / "config.json", config.to_json(), mode=0o600)


def load_manifest(root: Path, manifest_id: bytes) -> Manifest:
    data = (root / "manifest").read_bytes()
    if codec.chunk_id(data) != manifest_id:
        raise CorruptObject(f"{root}/manifest does not match its id")
    return Manifest.from_bytes(data)


def read_marks(root: Path, manifest: Manifest, manifest_id: bytes) -> bytes:
    with open(root / "index", "rb") as f:
        head = f.read(idx.HEADER_SIZE)
        idx.check_header(head, manifest, manifest_id)
        return f.read(manifest.count)


class ChunkFiles:
    """The open data and index files. ``store`` runs on worker threads (pwrite is safe
    there); the index object itself is only touched by the endpoint's event loop."""

    def __init__(self, root: Path, config: StreamConfig) -> None:
        self.root = root
        self.manifest = load_manifest(root, config.manifest_id)
        marks = read_marks(root, self.manifest, config.manifest_id)
        self.index = CacheIndex(self.manifest, marks)
        self.data_fd = os.open(root / "data", os.O_RDWR | os.O_CLOEXEC)
        self.index_fd = os.open(root / "index", os.O_RDWR | os.O_CLOEXEC)

    def read(self, offset: int, length: int) -> memoryview:
        data = os.pread(self.data_fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"short read of the stream cache at {offset}")
        return memoryview(data)

    def store_many(
        self, items: list[tuple[bytes, memoryview]]
    ) -> list[CorruptObject | OSError | None]:
        """``store`` each (id, envelope); per item, None when it is written or what failed."""
        results: list[CorruptObject | OSError | None] = []
        for cid, envelope in items:
            try:
                self.store(cid, envelope)
                results.append(None)
            except (CorruptObject, OSError) as exc:
                results.append(exc)
        return results

    def store(self, cid: bytes, envelope: bytes | memoryview) -> int:
        """Check an envelope against ``cid`` (BLAKE3 of the plaintext) and write the
        plaintext at every position of the chunk. Raises CorruptObject on any mismatch;
        nothing is written then. Returns the plaintext length."""
        plain = codec.decode(envelope, expected=cid)
        positions = self.index.positions[cid]
        for i in positions:
            n = self.manifest.chunk_len(i)
            if len(plain) < n:
                raise CorruptObject(f"chunk {cid.hex()[:16]}: shorter than its place")
            os.pwrite(self.data_fd, memoryview(plain)[:n], i * self.manifest.chunk_size)
        return len(plain)

    def persist(self, positions: list[int]) -> None:
        """Make chunks written so far durable, then mark them (the order crash safety
        rests on: data first, then the marks that vouch for it)."""
        if not positions:
            return
        os.fdatasync(self.data_fd)
        for first, count in mark_runs(positions):
            os.pwrite(self.index_fd, bytes([idx.CACHED]) * count, idx.HEADER_SIZE + first)
        os.fdatasync(self.index_fd)

    def close(self) -> None:
        for fd in (self.data_fd, self.index_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def offline_status(root: Path) -> dict[str, Any]:
    """Figures from the files alone (no endpoint running)."""
    config = read_config(root)
    manifest = load_manifest(root, config.manifest_id)
    marks = read_marks(root, manifest, config.manifest_id)
    index = CacheIndex(manifest, marks)
    return summary(config, index)


def summary(config: StreamConfig, index: CacheIndex) -> dict[str, Any]:
    return {
        "image": f"{config.image}@{config.version}",
        "machine": config.machine,
        "size": index.size,
        "cached_bytes": index.cached_bytes,
        "data_bytes": index.data_bytes,
        "cached_data_bytes": index.cached_data_bytes,
        "complete": index.complete,
    }
