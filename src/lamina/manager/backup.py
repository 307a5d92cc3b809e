"""``lamina backup DEST`` and ``lamina restore SRC``: a consistent copy of a home, also
while ``lamina serve`` runs on it, and bringing it back.

What belongs together, and why this order (docs/backup.md says it for administrators):

1. The store's shared lock is held throughout, so no ``store gc`` removes a pack meanwhile
   (imports go on: they take the same lock shared).
2. The database first: SQLite's online backup API (a snapshot that waits for no writer),
   or ``pg_dump`` (one transaction's snapshot).
3. Then the packs: written before the rows that name them and never changed after, so the
   packs present after the snapshot hold everything it names. A later backup into the same
   folder copies only the packs it lacks and drops those the home no longer has.
4. Then each machine's delta at a flush point: a running ``lamina serve`` copies them
   (``serve.control``); without one, each is copied under its lock.
5. The home's identity, the store's location record, the certificate authority.
6. Last ``lamina-backup.json``: a folder without it is an incomplete backup.

Layout:

    lamina-backup.json      {"format": 1, "home_id", "created", "database": "sqlite" |
                            "postgresql", "store": "local" | "s3://...", "packs", "deltas"}
    home.json               the home's identity (the database names it)
    database/lamina.db      SQLite        database/lamina.pgdump   PostgreSQL (pg_dump -Fc)
    store/location.json     where the packs live (a bucket's packs stay in the bucket)
    store/packs/XX/*.pack   a local store's packs
    deltas/NAME/            each machine's delta: delta.map, delta.data (and ended)
    tls/                    the home's certificate authority and server certificate
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy.engine import make_url

from lamina.control import NotListening, abstract_address, ask
from lamina.delta.file import copy_files, delta_base, exclusive
from lamina.errors import Conflict, InvalidInput, NotAHome, ToolError, UsageError
from lamina.files import fsync_dir, write_json_atomic
from lamina.home import IDENTITY, Home, read_identity
from lamina.manager.db import is_empty
from lamina.manager.home import open_home
from lamina.store.location import RECORD, resolve
from lamina.store.store import LOCK_TIMEOUT

MANIFEST: Final = "lamina-backup.json"
FORMAT: Final = 1


@dataclass
class BackupReport:
    home: str
    dest: str
    database: str  # sqlite | postgresql
    store: str  # local | s3://...
    packs: int = 0  # in the backup
    pack_bytes: int = 0  # copied by this run
    deltas: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RestoreReport:
    src: str
    home: str
    packs: int = 0  # copied into the home
    deltas: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # deltas left out, with why

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- backup ----------------------------------------------------------------------------------


def make_backup(home: Home, dest: Path) -> BackupReport:
    dest = dest.expanduser().absolute()
    _ = home.sessionmaker  # the home's own database, or a one-line refusal
    _prepare_dest(dest, home)
    location = resolve(home.store_dir, None, None)  # the recorded location
    report = BackupReport(str(home.root), str(dest), _kind(home.database_url), location.url)
    with home.store.backend.lock(exclusive=False, timeout=LOCK_TIMEOUT):
        _dump_database(home.database_url, dest / "database")
        if location.is_local:
            report.packs, report.pack_bytes = _sync_packs(home.store_dir, dest / "store")
        report.deltas = _copy_deltas(home, dest)
    _copy_file(home.root / IDENTITY, dest / IDENTITY)
    _copy_file(home.store_dir / RECORD, dest / "store" / RECORD)
    if home.tls_dir.is_dir():
        _replace_tree(home.tls_dir, dest / "tls")
    record = {"format": FORMAT, "home_id": home.id, "created": _now()}
    write_json_atomic(dest / MANIFEST, record | report.to_json(), mode=0o600)
    return report


def _prepare_dest(dest: Path, home: Home) -> None:
    """A new or empty folder, or an earlier backup of this home (refreshed in place)."""
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        earlier = _read_manifest(dest) if (dest / MANIFEST).exists() else None
        if earlier is None or earlier.get("home_id") != home.id:
            raise UsageError(f"{dest} is not empty and not a backup of {home.root}")
        (dest / MANIFEST).unlink()  # incomplete until this run writes it again
        fsync_dir(dest)
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)


def _kind(url: str) -> str:
    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise UsageError(f"cannot back up a {backend} database")
    return backend


def _dump_database(url: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        tmp = folder / ".lamina.db.tmp"
        tmp.unlink(missing_ok=True)
        src = sqlite3.connect(str(parsed.database), timeout=60)
        try:
            with contextlib.closing(sqlite3.connect(tmp)) as out:
                src.backup(out)
        finally:
            src.close()
        _fsync(tmp)
        os.replace(tmp, folder / "lamina.db")
    else:
        tmp = folder / ".lamina.pgdump.tmp"
        _run(["pg_dump", "--format=custom", f"--file={tmp}", f"--dbname={_libpq(url)}"])
        _fsync(tmp)
        os.replace(tmp, folder / "lamina.pgdump")
    fsync_dir(folder)


def _sync_packs(store_dir: Path, dest: Path) -> tuple[int, int]:
    """Copy the packs ``dest`` lacks, drop those the store no longer has: (packs, bytes)."""
    present = {p.relative_to(store_dir): p for p in store_dir.glob("packs/*/*.pack")}
    copied = 0
    for rel, src in sorted(present.items()):
        target = dest / rel
        size = src.stat().st_size
        if target.exists() and target.stat().st_size == size:
            continue  # immutable: same name, same bytes
        _copy_file(src, target)
        copied += size
    for old in dest.glob("packs/*/*.pack"):
        if old.relative_to(dest) not in present:
            old.unlink()
    return len(present), copied


def _copy_deltas(home: Home, dest: Path) -> list[str]:
    """Every machine's delta at a flush point into ``dest/deltas``."""
    fresh = dest / "deltas.new"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(mode=0o700)
    try:
        answer = ask(
            abstract_address("serve", home.root),
            {"op": "copy-deltas", "dest": str(fresh)},
            timeout=None,
            hung_up="lamina serve hung up while copying the deltas",
        )
        names = [str(n) for n in answer["deltas"]]
    except NotListening:  # no server: the deltas are ours to lock
        names = []
        for src in sorted(home.deltas_dir.iterdir()):
            if not (src / "delta.map").exists():
                continue
            try:
                with exclusive(src):
                    copy_files(src, fresh / src.name)
            except Conflict:
                raise Conflict(
                    f"machine {src.name}'s delta is in use and no `lamina serve` on this home "
                    "answers: stop what holds it (a commit, a reset) and back up again"
                ) from None
            names.append(src.name)
    shutil.rmtree(dest / "deltas", ignore_errors=True)
    os.replace(fresh, dest / "deltas")
    fsync_dir(dest)
    return names


# -- restore ---------------------------------------------------------------------------------


def restore_backup(src: Path, root: Path) -> RestoreReport:
    """Bring backup ``src`` into ``root``: a new (or empty) folder, or the backed-up home
    itself when its database is missing or empty (what it still holds is kept: packs,
    and deltas newer than the backup's)."""
    src = src.expanduser().absolute()
    meta = _read_manifest(src)
    home_id = str(meta.get("home_id"))
    if read_identity(src) != home_id:
        raise InvalidInput(f"{src}: home.json does not match {MANIFEST}")
    report = RestoreReport(str(src), str(root))
    new, existed = read_identity(root) is None, root.exists()
    before = set(root.iterdir()) if root.is_dir() else set()
    _claim(root, home_id)
    try:
        url = open_home(root, opening="create").database_url
        _load_database(src / "database", str(meta.get("database")), url)
        if not (root / "store" / RECORD).exists() and (src / "store" / RECORD).exists():
            _copy_file(src / "store" / RECORD, root / "store" / RECORD)
        report.packs = _sync_packs_into(src / "store", root / "store")
        if (src / "tls").is_dir() and not (root / "tls").exists():
            _replace_tree(src / "tls", root / "tls")
    except BaseException:
        if new and not existed:  # leave no half-restored home behind
            shutil.rmtree(root, ignore_errors=True)
        elif new:
            for made in set(root.iterdir()) - before:
                shutil.rmtree(made) if made.is_dir() else made.unlink()
        raise
    home = open_home(root)
    try:
        home.store.reindex()
        _restore_deltas(home, src / "deltas", report)
    finally:
        home.close()
    return report


def _claim(root: Path, home_id: str) -> None:
    """Make ``root`` the backed-up home, or check that it is that home, database lost."""
    existing = read_identity(root)
    if existing is None:
        if root.exists() and any(not p.name.startswith(".") for p in root.iterdir()):
            raise UsageError(f"{root} is not empty: restore into a new folder")
        root.mkdir(parents=True, exist_ok=True, mode=0o755)
        write_json_atomic(root / IDENTITY, _identity_record(home_id))
        return
    if existing != home_id:
        raise NotAHome(f"{root} is another home ({existing[:12]}...): restore into a new folder")
    if not is_empty(open_home(root).database_url):
        raise Conflict(
            f"{root} has its database: a restore would replace it (restore into a new folder)"
        )


def _identity_record(home_id: str) -> dict[str, Any]:
    return {"format": 1, "id": home_id, "created": _now()}


def _load_database(folder: Path, kind: str, url: str) -> None:
    target = make_url(url)
    if target.get_backend_name() != kind:
        want = "an empty PostgreSQL database" if kind == "postgresql" else "none (SQLite)"
        raise UsageError(f"this backup holds a {kind} database: set LAMINA_DATABASE_URL to {want}")
    if not is_empty(url):
        raise Conflict(f"the database {target.render_as_string()} is not empty")
    if kind == "sqlite":
        db = Path(str(target.database))
        for stale in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            stale.unlink(missing_ok=True)
        _copy_file(folder / "lamina.db", db)
        return
    _run(
        [
            "pg_restore",
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            f"--dbname={_libpq(url)}",
            str(folder / "lamina.pgdump"),
        ]
    )


def _sync_packs_into(src: Path, dest: Path) -> int:
    copied = 0
    for pack in sorted(src.glob("packs/*/*.pack")):
        target = dest / pack.relative_to(src)
        if not target.exists():
            _copy_file(pack, target)
            copied += 1
    return copied


def _restore_deltas(home: Home, src: Path, report: RestoreReport) -> None:
    """The backup's deltas of machines the restored database has, made on the image
    version each is pinned to, where the home has no delta of its own."""
    from lamina.manager.services import machines

    with home.session(read_only=True) as session:
        pinned = {m.name: m.image_version.manifest_id for m in machines.list_all(session)}
    for folder in sorted(src.iterdir()) if src.is_dir() else []:
        name, target = folder.name, home.deltas_dir / folder.name
        base = delta_base(folder)
        if name not in pinned:
            report.skipped.append(f"{name}: no such machine in the database")
        elif base is None or base.hex() != pinned[name]:
            report.skipped.append(f"{name}: made on another image version than it is pinned to")
        elif delta_base(target) is not None:
            report.skipped.append(f"{name}: the home has a delta of its own (kept)")
        else:
            copy_files(folder, target)
            report.deltas.append(name)


# -- helpers ---------------------------------------------------------------------------------


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{folder} is not a complete lamina backup (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{folder / MANIFEST}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidInput(f"{folder / MANIFEST}: unknown format (a newer lamina?)")
    return data


def _copy_file(src: Path, dest: Path) -> None:
    """``src`` to ``dest`` whole or not at all, durably."""
    if not src.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    shutil.copymode(src, tmp)
    _fsync(tmp)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def _replace_tree(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _libpq(url: str) -> str:
    """A SQLAlchemy URL as libpq reads it (pg_dump, pg_restore)."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def _run(command: list[str]) -> None:
    tool = shutil.which(command[0])
    if tool is None:
        raise ToolError(f"{command[0]} is not installed (Debian package postgresql-client)")
    proc = subprocess.run([tool, *command[1:]], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ToolError(f"{command[0]} failed: {detail}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
