"""Where a home's chunk store lives, chosen once and recorded in the home.

``LAMINA_STORE_URL=s3://BUCKET[/PREFIX]`` (with ``LAMINA_S3_ENDPOINT_URL`` for a store other
than AWS, and the standard ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) puts the packs of
a new home in a bucket; without it they stay in the home's ``store/`` folder. The first
command that opens the store writes the choice to ``store/location.json``:

    {"format": 1, "url": "local"}
    {"format": 1, "url": "s3://bucket/prefix", "endpoint_url": "http://..."}

Later commands follow the record, so a shell without the variable still reaches the
bucket, and one with a different URL is refused instead of silently opening an empty store.
The endpoint may change (a gateway moved); credentials are never written to the home.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from lamina.errors import StoreError, UsageError

if TYPE_CHECKING:
    from lamina.store.leases import Leases
    from lamina.store.store import ChunkStore

RECORD: Final = "location.json"
RECORD_FORMAT: Final = 1
LOCAL: Final = "local"
# The disk cache of a bucket-backed store, when LAMINA_STORE_CACHE_BYTES is unset.
DEFAULT_CACHE_BYTES: Final = 8 << 30
# S3's bucket naming rules, loosely (gateways accept some more): 3-63 characters.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class StoreLocation:
    url: str  # "local" or "s3://bucket[/prefix]"
    endpoint_url: str | None = None

    @property
    def is_local(self) -> bool:
        return self.url == LOCAL

    @property
    def bucket(self) -> str:
        return self.url.removeprefix("s3://").split("/", 1)[0]

    @property
    def prefix(self) -> str:
        parts = self.url.removeprefix("s3://").split("/", 1)
        return parts[1] if len(parts) > 1 else ""


def parse_store_url(url: str) -> str:
    """The canonical form of a LAMINA_STORE_URL (UsageError when it is not s3://...)."""
    if not url.startswith("s3://"):
        raise UsageError(f"LAMINA_STORE_URL must be s3://BUCKET[/PREFIX], not {url!r}")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not _BUCKET.match(bucket):
        raise UsageError(f"LAMINA_STORE_URL: {bucket!r} is not a valid bucket name")
    prefix = "/".join(p for p in prefix.split("/") if p)
    if any(p in (".", "..") for p in prefix.split("/")):
        raise UsageError(f"LAMINA_STORE_URL: bad prefix {prefix!r}")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def parse_size(text: str, name: str) -> int:
    """Bytes from ``123``, ``64M``, ``8GiB`` (binary units)."""
    m = _SIZE.match(text)
    if m is None:
        raise UsageError(f"{name} must be a size such as 8G or 536870912, not {text!r}")
    return int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))


def resolve(store_dir: Path, store_url: str | None, endpoint: str | None) -> StoreLocation:
    """The home's recorded location, recording the configured choice (``store_url``,
    ``endpoint``: LAMINA_STORE_URL, LAMINA_S3_ENDPOINT_URL) on first use."""
    wanted = parse_store_url(store_url) if store_url else None
    endpoint = endpoint or None
    recorded = _read(store_dir)
    if recorded is None:
        if wanted is not None and any((store_dir / "packs").glob("*/*.pack")):
            raise UsageError(
                f"{store_dir} already holds local packs; LAMINA_STORE_URL cannot move them "
                "(use a new home for a bucket)"
            )
        chosen = StoreLocation(wanted or LOCAL, endpoint if wanted else None)
        recorded = _record(store_dir, chosen)
    if wanted is not None and wanted != recorded.url:
        raise UsageError(
            f"this home keeps its chunks in {_show(recorded.url)}, not {wanted}: "
            "unset LAMINA_STORE_URL or use another home"
        )
    if not recorded.is_local and endpoint:
        return StoreLocation(recorded.url, endpoint)
    return recorded


def _show(url: str) -> str:
    return "its local store" if url == LOCAL else url


def _read(store_dir: Path) -> StoreLocation | None:
    try:
        data = json.loads((store_dir / RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{store_dir / RECORD}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise StoreError(f"{store_dir / RECORD}: unknown format (a newer lamina?)")
    url = data.get("url")
    if url != LOCAL:
        url = parse_store_url(str(url))
    endpoint = data.get("endpoint_url")
    return StoreLocation(url, str(endpoint) if endpoint else None)


def _record(store_dir: Path, location: StoreLocation) -> StoreLocation:
    """Write the record unless another process just did; returns the one that won."""
    store_dir.mkdir(parents=True, exist_ok=True)
    body: dict[str, object] = {"format": RECORD_FORMAT, "url": location.url}
    if location.endpoint_url:
        body["endpoint_url"] = location.endpoint_url
    tmp = store_dir / f".{RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(body) + "\n")
    try:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.link(tmp, store_dir / RECORD)  # fails if another process recorded first
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    found = _read(store_dir)
    assert found is not None
    return found


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where the chunk store is (LAMINA_STORE_URL, LAMINA_S3_ENDPOINT_URL) and how much
    disk a bucket's cache may use (LAMINA_STORE_CACHE_BYTES), as the settings give them."""

    url: str | None = None
    endpoint_url: str | None = None
    cache_bytes: str | None = None

    @classmethod
    def load(cls) -> StoreSettings:
        from lamina.settings import load  # pydantic: read by a command, not by NBD workers

        settings = load()
        return cls(settings.store_url, settings.s3_endpoint_url, settings.store_cache_bytes)


def open_store(
    store_dir: Path,
    *,
    leases: Callable[[], Leases | None] | None = None,
    settings: StoreSettings | None = None,
) -> ChunkStore:
    """The home's chunk store: local, or a bucket with a bounded disk cache beside it.
    ``leases`` gives a bucket's writers and gc their leases when other homes may share it
    (else the home's file lock keeps them apart); ``settings``: as already read (else
    read now)."""
    from lamina.store.store import ChunkStore

    settings = settings or StoreSettings.load()
    location = resolve(store_dir, settings.url, settings.endpoint_url)
    if location.is_local:
        return ChunkStore.open_local(store_dir)
    from lamina.store.backends.local import LocalBackend
    from lamina.store.backends.s3 import S3Backend
    from lamina.store.diskcache import DiskChunkCache
    from lamina.store.index import Index
    from lamina.store.remote import RemoteChunkStore

    capacity = DEFAULT_CACHE_BYTES
    if settings.cache_bytes:
        capacity = parse_size(settings.cache_bytes, "LAMINA_STORE_CACHE_BYTES")
    backend = S3Backend(
        location.bucket,
        location.prefix,
        endpoint_url=location.endpoint_url,
        lock=LocalBackend(store_dir).lock,  # verify and reindex within this home
    )
    cache = DiskChunkCache(store_dir / "cache", capacity)
    store = RemoteChunkStore(backend, Index(store_dir / "index.sqlite"), cache)
    store.leases = leases() if leases is not None else None
    return store
