"""The content-addressed chunk store: put/get/has, dedup, verify, gc.

It knows nothing of images or layers. Writers hold the store's shared lock for as long as
they may refer to chunks they found already present; ``gc`` takes the exclusive lock and
asks its caller for the live set only then, so a chunk an import is about to reference is
never collected (the import either finished and its manifest is live, or gc waits).

A bucket shared by several homes has no lock they all see: there writers hold import
leases and gc condemns packs before it deletes them (``lamina.store.leases``).
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from lamina.errors import CorruptObject, NotFound, StoreError
from lamina.store import codec
from lamina.store.backends import Backend, LocalBackend
from lamina.store.backends.base import Buffer
from lamina.store.index import Index, Location
from lamina.store.leases import GC, IMPORT, HeldLease, Leases, held
from lamina.store.pack import Entry, PackBuilder, read_trailer, scan

# 32 MiB packs: an fsync per 32 MiB costs under 2% of an import here, and gc rewrites at
# most that much to reclaim one dead chunk.
PACK_TARGET: Final = 32 << 20
# A pack is rewritten by gc when less than this share of its bytes is still referenced.
REPACK_BELOW: Final = 0.7
LOCK_TIMEOUT: Final = 3600.0

Progress = Callable[[int], None]


def _noop(_: int) -> None:
    pass


@dataclass(frozen=True, slots=True)
class PutResult:
    chunk_id: bytes
    new: bool
    stored: int  # envelope bytes added to the store (0 when deduplicated)


@dataclass(slots=True)
class VerifyReport:
    packs: int = 0
    chunks: int = 0
    bytes: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (chunk id or pack, reason)

    @property
    def ok(self) -> bool:
        return not self.corrupt


@dataclass(slots=True)
class GcReport:
    chunks_removed: int = 0
    chunks_spared: int = 0  # unreferenced, but kept: see ``ChunkStore.gc``'s ``spare``
    packs_removed: int = 0
    packs_rewritten: int = 0
    bytes_freed: int = 0
    packs_condemned: int = 0  # a shared bucket: to be deleted by a later gc
    packs_pardoned: int = 0  # condemned, then found still needed


@dataclass(frozen=True, slots=True)
class Usage:
    packs: int
    pack_bytes: int
    chunks: int


class Writer:
    """Adds chunks through in-memory packs; full packs are written and indexed by
    background threads while chunking goes on, and ``flush`` waits for all of them.

    A backend may take several puts at once (``put_depth``, 1 when it does not say): at
    most that many packs are being written, and one more is filling (64 MiB locally).
    """

    def __init__(self, store: ChunkStore, level: int, lease: HeldLease | None = None) -> None:
        self.store = store
        self.level = level
        self.lease = lease
        self._pack = PackBuilder()
        self._lock = threading.Lock()
        self._in_flight: set[bytes] = set()  # ids in packs being written
        self._depth = max(1, int(getattr(store.backend, "put_depth", 1)))
        self._sealer = ThreadPoolExecutor(max_workers=self._depth, thread_name_prefix="pack")
        self._pending: deque[Future[None]] = deque()
        self.added_bytes = 0
        self.sealed: list[tuple[str, list[Entry]]] = []

    def has(self, cid: bytes) -> bool:
        return (
            cid == codec.ZERO_ID
            or cid in self._pack
            or cid in self._in_flight
            or self.store.has(cid)
        )

    def put(self, data: bytes | memoryview, cid: bytes | None = None) -> PutResult:
        """Store one chunk unless it is zero or already present."""
        if codec.is_zero(data):
            return PutResult(codec.ZERO_ID, False, 0)
        if cid is None:
            cid = codec.chunk_id(data)
        if self.has(cid):
            return PutResult(cid, False, 0)
        return self.put_envelope(cid, *codec.encode_parts(data, cid, self.level))

    def put_envelope(self, cid: bytes, *parts: Buffer) -> PutResult:
        """Add an already encoded envelope (given whole or as header and payload)."""
        with self._lock:
            if cid in self._pack:
                return PutResult(cid, False, 0)
            entry = self._pack.add(cid, *parts)
            self.added_bytes += entry.size
            full = len(self._pack) >= PACK_TARGET
        if full:
            self._rotate()
        return PutResult(cid, True, entry.size)

    def _rotate(self) -> None:
        """Hand the filled pack to a background writer (once one is free)."""
        with self._lock:
            pack, self._pack = self._pack, PackBuilder()
        if not pack.entries:
            return
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        with self._lock:
            self._in_flight |= pack.ids
        self._pending.append(self._sealer.submit(self._write, pack))

    def _write(self, pack: PackBuilder) -> None:
        name = _pack_name()
        parts = pack.seal()
        self.store.backend.put(name, parts, durable=True)
        self.store.index_pack(name, pack.size, pack.entries)
        with self._lock:
            self._in_flight -= pack.ids  # indexed: store.has finds them now
            self.sealed.append((name, pack.entries))

    def flush(self) -> None:
        """Write what is buffered; returns once every chunk put so far is durable and indexed."""
        self._rotate()
        while self._pending:
            self._pending.popleft().result()
        if self.lease is not None:
            self.lease.check()  # no manifest is committed on a lease gc stopped honouring

    def close(self) -> None:
        self._sealer.shutdown(wait=True)


def _pack_name() -> str:
    token = uuid.uuid4().hex
    return f"packs/{token[:2]}/{token}.pack"


class ChunkStore:
    def __init__(self, backend: Backend, index: Index) -> None:
        self.backend = backend
        self.index = index
        self.leases: Leases | None = None  # a bucket shared by several homes
        # packs gc condemned (with leases): their chunks count as absent to writers
        self.condemned: frozenset[str] = frozenset()

    @classmethod
    def open_local(cls, root: Path) -> ChunkStore:
        root.mkdir(parents=True, exist_ok=True)
        return cls(LocalBackend(root), Index(root / "index.sqlite"))

    @classmethod
    def in_memory(cls) -> ChunkStore:
        from lamina.store.backends import MemoryBackend

        return cls(MemoryBackend(), Index(None))

    def close(self) -> None:
        self.index.close()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    # -- reading --------------------------------------------------------------------------

    def has(self, cid: bytes) -> bool:
        if cid == codec.ZERO_ID:
            return True
        loc = self.index.lookup(cid)
        return loc is not None and loc.pack not in self.condemned

    def locate(self, cid: bytes) -> Location:
        loc = self.index.lookup(cid)
        if loc is None and self.reconcile():
            loc = self.index.lookup(cid)
        if loc is None:
            raise NotFound(f"chunk {cid.hex()} is not in the store")
        return loc

    def get_envelope(self, cid: bytes) -> bytes:
        """The stored envelope of a chunk, as it would travel to another store."""
        for attempt in range(2):
            loc = self.locate(cid)
            try:
                return self.backend.read(loc.pack, loc.offset, loc.size)
            except FileNotFoundError:
                if attempt:  # repacked under us twice: give up
                    raise StoreError(f"chunk {cid.hex()}: pack {loc.pack} vanished") from None
                # repacked by a gc elsewhere: the listing has the pack it is in now
                self.reconcile()
        raise AssertionError("unreachable")

    def peek(self, cid: bytes, n: int) -> bytes:
        """The first ``n`` bytes of a chunk, unchecked (see ``codec.peek``)."""
        return b"" if cid == codec.ZERO_ID else codec.peek(self.get_envelope(cid), n)

    def get(self, cid: bytes, verify: bool = True) -> bytes:
        """The plaintext of a chunk; the zero id reads as an empty bytes (caller pads)."""
        if cid == codec.ZERO_ID:
            return b""
        return codec.decode(self.get_envelope(cid), expected=cid, verify=verify)

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def writer(self, level: int = codec.DEFAULT_LEVEL) -> Iterator[Writer]:
        """A writer holding the store's shared lock (or an import lease); flushes on a
        clean exit."""
        with self._writing() as lease:
            self.reconcile()
            w = Writer(self, level, lease)
            try:
                yield w
                w.flush()
            finally:
                w.close()

    @contextmanager
    def _writing(self) -> Iterator[HeldLease | None]:
        if self.leases is None:
            with self.backend.lock(exclusive=False, timeout=LOCK_TIMEOUT):
                yield None
            return
        with held(self.leases, IMPORT, self.refresh_condemned) as lease:
            self.refresh_condemned()  # after the lease is recorded (see store.leases)
            yield lease

    def refresh_condemned(self) -> None:
        if self.leases is not None:
            self.condemned = frozenset(self.leases.condemned())

    def index_pack(self, name: str, size: int, entries: list[Entry]) -> None:
        """Index a pack; its chunks found in condemned packs are pointed at it."""
        self.index.add_pack(name, size, entries)
        if not self.condemned:
            return
        found = self.index.lookup_many(e.chunk_id for e in entries)
        self.index.move(
            (e.chunk_id, name, e.offset)
            for e in entries
            if e.chunk_id in found and found[e.chunk_id].pack in self.condemned
        )

    def reindex(self) -> int:
        """``reconcile`` under the shared lock, so no gc removes packs meanwhile."""
        with self.backend.lock(exclusive=False, timeout=LOCK_TIMEOUT):
            return self.reconcile()

    def reconcile(self) -> int:
        """Index packs the index does not know (a crash between pack and index writes),
        forget packs that are gone. Returns how many changes were made."""
        known = self.index.packs()
        present = set(self.backend.list("packs/"))
        changes = 0
        # Gone first: a chunk repacked by another home's gc is then indexed in its new pack.
        for name in known.keys() - present:
            self.index.remove_pack(name)
            changes += 1
        for name in sorted(present - known.keys()):
            size = self.backend.size(name)
            self.index_pack(name, size, self._trailer(name, size))
            changes += 1
        return changes

    def _trailer(self, name: str, size: int) -> list[Entry]:
        return read_trailer(functools.partial(self.backend.read, name), size, name)

    # -- maintenance ----------------------------------------------------------------------

    def verify(self, progress: Progress = _noop) -> VerifyReport:
        """Re-read every pack, re-hash every chunk, check the index against the packs."""
        report = VerifyReport()
        with self.backend.lock(exclusive=False, timeout=LOCK_TIMEOUT):
            self.reconcile()
            indexed: dict[str, dict[bytes, int]] = {}
            for cid, loc in self.index.all_chunks():
                indexed.setdefault(loc.pack, {})[cid] = loc.offset
            for name in sorted(self.backend.list("packs/")):
                data = self.backend.read(name)
                report.packs += 1
                report.bytes += len(data)
                seen: dict[bytes, int] = {}
                try:
                    for entry, result in scan(data, name):
                        report.chunks += 1
                        seen.setdefault(entry.chunk_id, entry.offset)
                        if isinstance(result, CorruptObject):
                            report.corrupt.append((entry.chunk_id.hex(), str(result)))
                except CorruptObject as exc:
                    report.corrupt.append((name, str(exc)))
                    seen = dict(indexed.get(name, {}))  # reported once, as the pack
                for cid, off in indexed.pop(name, {}).items():
                    if seen.get(cid) != off:
                        report.corrupt.append(
                            (cid.hex(), f"index points into {name} at a bad offset")
                        )
                progress(len(data))
            for name, cids in indexed.items():
                for cid in cids:
                    report.corrupt.append((cid.hex(), f"pack {name} is missing"))
        return report

    def gc(
        self,
        live: Callable[[], set[bytes]],
        progress: Progress = _noop,
        *,
        spare: Callable[[list[bytes]], set[bytes]] | None = None,
        dry_run: bool = False,
        timeout: float = LOCK_TIMEOUT,
    ) -> GcReport:
        """Remove every chunk not in ``live()``, rewriting packs that are mostly dead.

        ``spare(dead)`` names chunks among (or under) the dead that must stay all the same
        (what the caller cannot vouch for); ``dry_run`` reports what would go and changes
        nothing. On a bucket shared by several homes the dead packs are condemned, and
        deleted by a later run (``lamina.store.leases``)."""
        if self.leases is not None and not dry_run:
            return self._gc_shared(self.leases, live, progress, spare)
        report = GcReport()
        with self.backend.lock(exclusive=True, timeout=timeout):
            self.reconcile()
            keep = live()
            dead = [cid for cid, _ in self.index.all_chunks() if cid not in keep]
            if spare is not None and dead:
                spared = spare(dead)
                report.chunks_spared = sum(1 for c in dead if c in spared)
                dead = [c for c in dead if c not in spared]
            if dry_run:
                return self._plan(set(dead), report)
            self.index.remove_chunks(dead)
            report.chunks_removed = len(dead)
            self._collect(report, progress)
        return report

    def _collect(self, report: GcReport, progress: Progress) -> None:
        """Drop or rewrite the packs whose indexed chunks are now mostly gone (lock held)."""
        rewriter = Writer(self, codec.DEFAULT_LEVEL)
        doomed: list[str] = []
        try:
            for name, size in sorted(self.index.packs().items()):
                live_here = self._live_entries(name, size, self.index.chunks_in(name))
                if sum(e.size for e in live_here) < REPACK_BELOW * size:
                    if live_here:
                        self._rewrite(name, live_here, rewriter)
                        report.packs_rewritten += 1
                    doomed.append(name)
                    report.bytes_freed += size
                progress(size)
            rewriter.flush()
        finally:
            rewriter.close()  # its writer thread, also when a corrupt chunk stops gc
        # The rewriter's packs were indexed with INSERT OR IGNORE, which kept the old
        # locations; point the index at the new copies before the old packs go.
        for pack_name, entries in rewriter.sealed:
            self.index.move((e.chunk_id, pack_name, e.offset) for e in entries)
        for name in doomed:
            self.index.remove_pack(name)
            self.backend.delete(name)
            report.packs_removed += 1
        report.bytes_freed -= rewriter.added_bytes
        # Every put happens under the shared lock (writers) or here: with the exclusive
        # lock held, any temporary left is from a writer that was killed.
        self._clean_temporaries()

    def _plan(self, dead: set[bytes], report: GcReport) -> GcReport:
        """What ``gc`` would remove and rewrite, from the index alone (lock held)."""
        kept: dict[str, int] = {}
        for cid, loc in self.index.all_chunks():
            if cid not in dead:
                kept[loc.pack] = kept.get(loc.pack, 0) + loc.size
        report.chunks_removed = len(dead)
        for name, size in self.index.packs().items():
            live_bytes = kept.get(name, 0)
            if live_bytes < REPACK_BELOW * size:
                report.packs_removed += 1
                report.packs_rewritten += 1 if live_bytes else 0
                report.bytes_freed += size - live_bytes
        return report

    def _clean_temporaries(self) -> None:
        clean = getattr(self.backend, "clean_temporaries", None)
        if clean is not None:
            clean(older_than=0.0)

    def _gc_shared(
        self,
        leases: Leases,
        live: Callable[[], set[bytes]],
        progress: Progress,
        spare: Callable[[list[bytes]], set[bytes]] | None,
    ) -> GcReport:
        report = GcReport()
        with held(leases, GC):
            self.refresh_condemned()
            self.reconcile()
            # Which condemned packs may go is settled before the live set is read: every
            # import that could have reused their chunks has committed by then.
            ready = [n for n in leases.deletable() if n in self.condemned]
            keep = live()
            if spare is not None:
                dead = [cid for cid, _ in self.index.all_chunks() if cid not in keep]
                spared = spare(dead) if dead else set()
                report.chunks_spared = sum(1 for c in dead if c in spared)
                keep |= spared
            self._delete_condemned(leases, ready, keep, report)
            self.refresh_condemned()
            doomed = [name for name, _ in self._sweep(keep, progress, report)]
            leases.condemn(doomed)
            report.packs_condemned = len(doomed)
            self.refresh_condemned()
            self._clean_temporaries()
        return report

    def _delete_condemned(
        self, leases: Leases, ready: list[str], keep: set[bytes], report: GcReport
    ) -> None:
        """Delete condemned packs no live chunk is found only in; pardon the others."""
        packs = self.index.packs()
        for name in ready:
            size = packs.get(name)
            if size is not None:
                entries = self._trailer(name, size)
                # the chunks this index forgot as dead come back, where not found elsewhere
                self.index.add_pack(name, size, entries)
                found = self.index.lookup_many(e.chunk_id for e in entries if e.chunk_id in keep)
                if any(loc.pack == name for loc in found.values()):
                    leases.pardon([name])
                    report.packs_pardoned += 1
                    continue
                self.index.remove_pack(name)
                self.backend.delete(name)
                report.packs_removed += 1
                report.bytes_freed += size
            leases.pardon([name])  # deleted, or gone already

    def _sweep(
        self, keep: set[bytes], progress: Progress, report: GcReport
    ) -> list[tuple[str, int]]:
        """Copy the live chunks out of the packs that are mostly dead and return those
        packs (name, size), to be condemned. The index keeps the dead chunks: they stay
        readable until their pack goes (an older import may still commit a manifest that
        names them)."""
        report.chunks_removed = sum(1 for cid, _ in self.index.all_chunks() if cid not in keep)
        rewriter = Writer(self, codec.DEFAULT_LEVEL)
        doomed: list[tuple[str, int]] = []
        try:
            for name, size in sorted(self.index.packs().items()):
                if name in self.condemned:
                    continue  # condemned at an earlier run: goes once it may
                indexed = self.index.chunks_in(name)
                here = {cid: at for cid, at in indexed.items() if cid in keep}
                live_here = self._live_entries(name, size, here)
                if sum(e.size for e in live_here) < REPACK_BELOW * size:
                    if live_here:
                        self._rewrite(name, live_here, rewriter)
                        report.packs_rewritten += 1
                    doomed.append((name, size))
                progress(size)
            rewriter.flush()
        finally:
            rewriter.close()  # its writer thread, also when a corrupt chunk stops gc
        # The rewriter's packs were indexed with INSERT OR IGNORE, which kept the old
        # locations; point the index at the new copies before the old packs go.
        for pack_name, entries in rewriter.sealed:
            self.index.move((e.chunk_id, pack_name, e.offset) for e in entries)
        report.bytes_freed -= rewriter.added_bytes
        return doomed

    def _live_entries(self, name: str, size: int, live_here: dict[bytes, int]) -> list[Entry]:
        """The envelopes of a pack that the index still points at (from its trailer)."""
        if not live_here:
            return []
        entries = read_trailer(functools.partial(self.backend.read, name), size, name)
        return [e for e in entries if live_here.get(e.chunk_id) == e.offset]

    def _rewrite(self, name: str, live: list[Entry], rewriter: Writer) -> None:
        """Copy the live envelopes of a pack, each checked against its id (the dead ones
        are neither decoded nor hashed)."""
        data = self.backend.read(name)
        for entry in live:
            envelope = data[entry.offset : entry.offset + entry.size]
            try:
                codec.decode(envelope, expected=entry.chunk_id)
            except CorruptObject as exc:
                raise StoreError(f"gc stopped: {exc} (run `lamina store verify`)") from None
            rewriter.put_envelope(entry.chunk_id, envelope)

    def usage(self) -> Usage:
        return Usage(*self.index.totals())
