"""A layer version's EROFS image as a local file whose bytes arrive on first read.

``lamina.stream.layerfile`` runs one process per lazily attached layer version. It mounts
a FUSE filesystem whose root is a read-only regular file the size of the image (the
protocol is in ``fuse.py``); EROFS is then mounted on that file, file-backed, as the
layer's lower directory. A read the cache cannot answer fetches the chunks covering it
from the manager (``GET /chunks/{id}``, or ``POST /chunks/batch`` for several), checks
each envelope against its chunk id (BLAKE3 of the plaintext) and writes it to the cache
before the kernel sees a byte: a corrupt chunk is refused and fetched again, bypassing
HTTP caches, up to ``ATTEMPTS`` times.

The cache is a stream cache (``cache.py``: manifest, sparse data file, index of verified
chunks), so a restarted process, or one with the manager away, serves what it has. A read
of a missing chunk while the manager is unreachable fails with EIO at once (no retry
loop: the caller is a process reading a file, and a hang there is worse than an error);
the process then says it is offline in ``status.json`` and counts what it could not read.

DIR/profile     chunk indices in the order reads first asked for them (``image.profile``
                encoding), for the manager's read-ahead profile of the layer
DIR/readahead   the manager's profile when the layer was attached: fetched first, in
                batches, by a background thread
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from lamina.errors import CorruptObject, LaminaError, Unreachable, from_http
from lamina.files import write_atomic, write_json_atomic
from lamina.image import profile as profiles
from lamina.layer import mountapi
from lamina.logs import event
from lamina.stream import fuse
from lamina.stream.cache import ChunkFiles, StreamConfig, read_config

log = logging.getLogger("lamina.layerfile")
ATTEMPTS = 3
THREADS = 4  # concurrent kernel reads served (EROFS reads ahead on several at once)
PERSIST_EVERY = 0.2  # seconds between index/status writes (a crash refetches that much)
# Chunk ids per read-ahead request: 4 MiB of 64 KiB chunks. A read needing a chunk of a
# batch in flight waits for the whole batch, so batches stay small.
PREFETCH_BATCH = 64
FSTYPE = "fuse.lamina-layer"
_RECORD = struct.Struct(">32sI")
API: Final = "/api/v1"
MOUNT_FLAGS = mountapi.MS_RDONLY | mountapi.MS_NOSUID | mountapi.MS_NODEV


class Source(Protocol):
    def fetch(self, ids: list[bytes], *, fresh: bool) -> Iterator[tuple[bytes, bytes]]:
        """(id, envelope) of some of ``ids``, unverified; raises Unreachable (or what the manager answered)."""
        ...


class HttpSource:
    """The manager over HTTP/1.1 keep-alive, one connection per serving thread. Python's
    own ``http.client``: the server starts in 0.3 s instead of 0.7 s with httpx, and its
    start is part of a login."""

    def __init__(self, url: str, token: str, *, ca: Path | None = None, timeout: float = 5.0):
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/") + API
        self.headers = {"Authorization": f"Bearer {token}", "User-Agent": "lamina-layerfile"}
        self.timeout = timeout
        self.ca = ca
        self.local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self.local, "conn", None)
        if conn is None:
            if self.https:
                from lamina.trust.contexts import client_context

                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=client_context(self.ca)
                )
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.local.conn = conn
        return conn

    def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> bytes:
        for attempt in range(2):  # a kept-alive connection the manager closed: once more
            conn = self._connection()
            try:
                conn.request(method, self.prefix + path, body=body, headers=self.headers | headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self.local.conn = None
                if attempt == 0 and isinstance(exc, http.client.RemoteDisconnected):
                    continue
                raise Unreachable(f"{path}: {type(exc).__name__}: {exc}") from None
            if response.status >= 400:
                raise from_http(response.status, data, what=path)
            return data
        raise Unreachable(f"{path}: no answer")

    def fetch(self, ids: list[bytes], *, fresh: bool) -> Iterator[tuple[bytes, bytes]]:
        headers = {"Cache-Control": "no-cache"} if fresh else {}
        if len(ids) == 1:
            yield ids[0], self._request("GET", f"/chunks/{ids[0].hex()}", None, headers)
            return
        # The batch answers a prefix of the ids asked (framed as uploads are); the caller
        # asks again for what is still missing.
        body = json.dumps({"ids": [c.hex() for c in ids]}).encode()
        headers["Content-Type"] = "application/json"
        data = self._request("POST", "/chunks/batch", body, headers)
        pos = 0
        while pos + _RECORD.size <= len(data):
            cid, size = _RECORD.unpack_from(data, pos)
            yield cid, data[pos + _RECORD.size : pos + _RECORD.size + size]
            pos += _RECORD.size + size


class LayerFile:
    """The image's bytes: from the cache, or fetched, verified and cached first."""

    def __init__(self, root: Path, config: StreamConfig, source: Source) -> None:
        self.root = root
        self.config = config
        self.files = ChunkFiles(root, config)
        self.index = self.files.index
        self.source = source
        self.lock = threading.Lock()
        self.inflight: dict[bytes, threading.Event] = {}
        self.order: list[int] = []  # chunk indices in the order reads first needed them
        self.seen: set[int] = set()
        self.figures = {"fetched_chunks": 0, "fetched_bytes": 0, "corrupt": 0, "eio": 0}
        self.offline = False
        self.last_error = ""
        self.missing: set[bytes] = set()  # chunks asked for while offline

    # -- reads ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``; OSError(EIO) when they cannot be had."""
        if size <= 0:
            return b""
        with self.lock:
            self._note(offset, size)
            wanted = self.index.missing(offset, size)
        if wanted:
            self.ensure(wanted)
        return bytes(self.files.read(offset, size))

    def _note(self, offset: int, size: int) -> None:
        cs = self.index.manifest.chunk_size
        for i in range(offset // cs, (offset + size - 1) // cs + 1):
            if i not in self.seen:
                self.seen.add(i)
                self.order.append(i)

    def ensure(self, ids: list[bytes]) -> None:
        """Have every chunk of ``ids`` in the cache, fetching those nobody is fetching."""
        mine: list[bytes] = []
        theirs: list[threading.Event] = []
        with self.lock:
            for cid in ids:
                if self.index.id_cached(cid):
                    continue
                waiting = self.inflight.get(cid)
                if waiting is not None:
                    theirs.append(waiting)
                else:
                    self.inflight[cid] = threading.Event()
                    mine.append(cid)
        try:
            if mine:
                self._fetch(mine)
        finally:
            with self.lock:
                for cid in mine:
                    self.inflight.pop(cid).set()
        for done in theirs:
            done.wait()
        with self.lock:
            lacking = [c for c in mine if not self.index.id_cached(c)]
            lacking += [c for c in ids if not self.index.id_cached(c)]
            if lacking:
                self.figures["eio"] += 1
        if lacking:
            raise OSError(errno.EIO, "layer data not available")

    def _fetch(self, ids: list[bytes]) -> None:
        """Fetch ``ids`` until all arrived whole; a round that brings nothing new (every
        envelope corrupt) counts as an attempt. A batch may answer a prefix only: that is
        progress, and the rest is asked for again."""
        pending, attempts = list(ids), 0
        while pending and attempts < ATTEMPTS:
            try:
                got = self._receive(pending, fresh=attempts > 0)
            except LaminaError as exc:
                self._went_offline(pending, exc)
                return
            if not got:
                attempts += 1
            done = set(got)
            pending = [c for c in pending if c not in done]
        if pending:
            self.last_error = f"{len(pending)} chunks arrived corrupt {ATTEMPTS} times"
            event(log, "layerfile_corrupt", logging.ERROR, count=len(pending))

    def _receive(self, ids: list[bytes], *, fresh: bool) -> list[bytes]:
        wanted, got = set(ids), []
        for cid, envelope in self.source.fetch(ids, fresh=fresh):
            if cid not in wanted:
                continue  # not asked for: ignored, never written
            try:
                self.files.store(cid, envelope)  # checked against cid before written
            except CorruptObject:
                with self.lock:
                    self.figures["corrupt"] += 1
                continue
            with self.lock:
                self.index.add(cid)
                self.missing.discard(cid)
                self.figures["fetched_chunks"] += 1
                self.figures["fetched_bytes"] += len(envelope)
            got.append(cid)
        if self.offline:
            self.offline = False
            event(log, "layerfile_online", logging.INFO, layer=self.config.image)
        return got

    def _went_offline(self, ids: list[bytes], exc: Exception) -> None:
        with self.lock:
            self.missing.update(ids)
        self.last_error = str(exc)
        if not self.offline:
            self.offline = True
            event(
                log, "layerfile_offline", logging.WARNING, layer=self.config.image, error=str(exc)
            )

    # -- read-ahead ------------------------------------------------------------------

    def prefetch(self, indices: list[int]) -> None:
        """Fetch the chunks at ``indices`` in batches (the layer's read-ahead profile)."""
        ids = list(
            dict.fromkeys(
                self.index.manifest.id_at(i) for i in indices if 0 <= i < self.index.manifest.count
            )
        )
        for start in range(0, len(ids), PREFETCH_BATCH):
            with contextlib.suppress(OSError):
                self.ensure(ids[start : start + PREFETCH_BATCH])
            if self.offline:
                return

    # -- state on disk ---------------------------------------------------------------

    def persist(self) -> None:
        with self.lock:
            positions = self.index.take_pending()
            order = list(self.order)
        self.files.persist(positions)
        write_atomic(self.root / "profile", profiles.encode(order))
        write_json_atomic(self.root / "status.json", self.status())

    def status(self) -> dict[str, Any]:
        index = self.index
        return {
            "layer": f"{self.config.image}@{self.config.version}",
            "size": index.size,
            "cached_bytes": index.cached_bytes,  # zero chunks included
            "data_bytes": index.data_bytes,
            "cached_data_bytes": index.cached_data_bytes,
            "complete": index.complete,
            "offline": self.offline,
            "missing_chunks": len(self.missing),
            "last_error": self.last_error,
            "pid": os.getpid(),
            **self.figures,
        }


# -- the FUSE side --------------------------------------------------------------------


def _serve_one(fd: int, session: fuse.FuseFile, layer: LayerFile) -> bool:
    """Answer one request; False once the filesystem is gone."""
    try:
        data = os.read(fd, fuse.BUFFER)
    except OSError as exc:
        # EINTR/ENOENT: an interrupted request the kernel dropped; ENODEV: unmounted.
        return exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN)
    request = fuse.parse(data)
    answer = session.handle(request)
    if isinstance(answer, fuse.ReadAsk):
        ask = answer
        try:
            answer = fuse.reply(ask.unique, layer.read(ask.offset, ask.size))
        except OSError as exc:
            answer = fuse.reply(ask.unique, error=exc.errno or errno.EIO)
    if answer is not None:
        with contextlib.suppress(OSError):  # ENOENT: the request was interrupted meanwhile
            os.write(fd, answer)
    return not session.destroyed


def mount(target: Path, size: int) -> tuple[int, fuse.FuseFile]:
    """Mount the file at ``target`` (an existing regular file); the /dev/fuse fd."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={fd},rootmode=100444,user_id=0,group_id=0,allow_other,max_read={fuse.MAX_READ}"
    try:
        mountapi.mount("lamina-layer", target, FSTYPE, MOUNT_FLAGS, options)
    except OSError:
        os.close(fd)
        raise
    return fd, fuse.FuseFile(size)


def serve(root: Path, target: Path, source: Source | None = None) -> None:
    """Mount the layer's image at ``target`` and answer the kernel until it is unmounted."""
    config = read_config(root)
    if source is None:
        from lamina.stream.cache import ca_file

        source = HttpSource(config.url, config.token, ca=ca_file(root))
    layer = LayerFile(root, config, source)
    fd, session = mount(target, config.size)
    print("ready", flush=True)
    stop = threading.Event()
    workers = [
        threading.Thread(target=_loop, args=(fd, session, layer, stop), daemon=True)
        for _ in range(THREADS)
    ]
    for worker in workers:
        worker.start()
    readahead = root / "readahead"
    if readahead.exists():
        order = profiles.decode(readahead.read_bytes())
        threading.Thread(target=layer.prefetch, args=(order,), daemon=True).start()
    try:
        while not stop.wait(PERSIST_EVERY):
            layer.persist()
    finally:
        layer.persist()
        os.close(fd)


def _loop(fd: int, session: fuse.FuseFile, layer: LayerFile, stop: threading.Event) -> None:
    try:
        while _serve_one(fd, session, layer):
            pass
    except Exception:
        log.exception("layerfile: serving failed")
    finally:
        stop.set()


def main(argv: list[str] | None = None) -> int:
    """``python -m lamina.stream.layerfile CACHE_DIR FILE``: mount and serve; prints
    "ready" once mounted. The process forks first, and its parent exits at once, so the
    caller reaps it and the server is nobody's child (no zombie in a long-lived agent)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m lamina.stream.layerfile CACHE_DIR FILE", file=sys.stderr)
        return 2
    if os.fork() != 0:
        os._exit(0)  # before any thread exists: the child is a clean copy
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve(Path(args[0]), Path(args[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
