"""Where each chunk lives: chunk id -> (pack, offset, size), in SQLite.

The index is derived data: every entry can be rebuilt from the packs' trailers, so it runs
with ``synchronous=NORMAL`` (a power loss may drop the last transactions, never corrupt the
file) and the store reconciles it with the packs it finds.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import StoreError
from lamina.store.pack import Entry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    records INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY,
    pack TEXT NOT NULL,
    offset INTEGER NOT NULL,
    size INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack);
"""


@dataclass(frozen=True, slots=True)
class Location:
    pack: str
    offset: int
    size: int


class Index:
    """One SQLite connection guarded by a lock; cheap enough (a lookup is ~5 µs)."""

    def __init__(self, path: Path | None) -> None:
        target = str(path) if path is not None else ":memory:"
        try:
            self._db = sqlite3.connect(
                target, timeout=60, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"chunk index {target}: {exc}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def lookup(self, cid: bytes) -> Location | None:
        with self._lock:
            row = self._db.execute(
                "SELECT pack, offset, size FROM chunks WHERE id=?", (cid,)
            ).fetchone()
        return Location(*row) if row else None

    def lookup_many(self, cids: Iterable[bytes]) -> dict[bytes, Location]:
        found: dict[bytes, Location] = {}
        batch = list(set(cids))
        with self._lock:
            for i in range(0, len(batch), 500):
                part = batch[i : i + 500]
                marks = ",".join("?" * len(part))
                sql = f"SELECT id, pack, offset, size FROM chunks WHERE id IN ({marks})"
                for cid, pack, off, size in self._db.execute(sql, part):
                    found[cid] = Location(pack, off, size)
        return found

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, all of it or (on any error) none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def add_pack(self, name: str, size: int, entries: Iterable[Entry]) -> None:
        rows = [(e.chunk_id, name, e.offset, e.size) for e in entries]
        with self._writing() as db:
            db.execute("INSERT OR REPLACE INTO packs VALUES (?,?,?)", (name, size, len(rows)))
            db.executemany("INSERT OR IGNORE INTO chunks VALUES (?,?,?,?)", rows)

    def move(self, moves: Iterable[tuple[bytes, str, int]]) -> None:
        """Point chunks at their new copies: (id, pack, offset) after a repack."""
        with self._writing() as db:
            db.executemany(
                "UPDATE chunks SET pack=?, offset=? WHERE id=?", [(p, o, c) for c, p, o in moves]
            )

    def remove_chunks(self, cids: Iterable[bytes]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM chunks WHERE id=?", [(c,) for c in cids])

    def remove_pack(self, name: str) -> None:
        with self._writing() as db:
            db.execute("DELETE FROM chunks WHERE pack=?", (name,))
            db.execute("DELETE FROM packs WHERE name=?", (name,))

    def packs(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, size FROM packs").fetchall())

    def chunks_in(self, pack: str) -> dict[bytes, int]:
        """Indexed chunk id -> offset for one pack."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, offset FROM chunks WHERE pack=?", (pack,)
            ).fetchall()
        return dict(rows)

    def following(self, pack: str, offset: int, span: int) -> list[tuple[bytes, int, int]]:
        """(id, offset, size) of the chunks of ``pack`` that start in
        ``[offset, offset+span)``, in pack order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, offset, size FROM chunks WHERE pack=? AND offset>=? AND offset<?"
                " ORDER BY offset",
                (pack, offset, offset + span),
            ).fetchall()
        return [(bytes(c), int(o), int(n)) for c, o, n in rows]

    def all_chunks(self) -> Iterator[tuple[bytes, Location]]:
        with self._lock:
            rows = self._db.execute("SELECT id, pack, offset, size FROM chunks").fetchall()
        for cid, pack, off, size in rows:
            yield cid, Location(pack, off, size)

    def totals(self) -> tuple[int, int, int]:
        """(packs, pack bytes, chunks)."""
        with self._lock:
            n_packs, pack_bytes = self._db.execute(
                "SELECT count(*), coalesce(sum(size),0) FROM packs"
            ).fetchone()
            (n_chunks,) = self._db.execute("SELECT count(*) FROM chunks").fetchone()
        return int(n_packs), int(pack_bytes), int(n_chunks)

    def sizes(self, cids: Iterable[bytes]) -> dict[bytes, int]:
        return {c: loc.size for c, loc in self.lookup_many(cids).items()}
