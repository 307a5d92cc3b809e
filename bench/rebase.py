"""Rebase 1,000 writable layers after a patch of their base.

The base has 50,000 files (configuration text under /etc, the rest under /usr, /opt,
/var); the patch touches 5,000 of them (4,800 changed, of which the /etc ones by one line,
100 deleted, 100 added). Each of the 1,000 writable layers holds 200 changed files, as a
session would leave them: 120 new files in the user's home, 40 /etc files with a line
added, 30 files under /usr replaced, 10 base files deleted. About one in ten of the base
files a user changed is also in the patch: those are merged line by line (/etc), or the
patch wins and the user's copy is saved (/usr).

Layers are written straight into the store and the database (what ``umount`` would have
recorded; building them through 1,000 overlay sessions would only time the kernel). The
timed part is the command an admin runs, in a fresh process, with its default of one
worker per core: ``lamina rebase --all --from base@1 --onto base@2``.

Prints ``rebase 1000 layers in … s, … layers/s`` first. Target: under 60 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import time

from common import LAMINA, run, scratch
from lamina.home import Home
from lamina.layer.importer import store_manifest
from lamina.layer.records import APP, WRITABLE, NewVersion
from lamina.layer.tree import Entry, Kind, Tree
from lamina.manager.home import init_home
from lamina.manager.services import layers as svc
from lamina.names import parse_ref
from lamina.store import Writer

BASE_FILES = 50_000
ETC_FILES = 2_000
PATCHED = 5_000
LAYERS = int(os.environ.get("LAMINA_BENCH_LAYERS", "1000"))
PER_DIR = 100
CONF_LINES = 12
MTIME = 1_700_000_000_000_000_000


def conf(i: int, edit: str | None = None) -> bytes:
    lines = [f"option{k} = value {i}.{k}\n" for k in range(CONF_LINES)]
    if edit is not None:
        lines[1] = f"option1 = {edit}\n"  # the patch edits near the top; users append
    return "".join(lines).encode()


def blob(i: int, tag: str) -> bytes:
    return f"{tag} file {i}\n".encode() * (8 + i % 60)


def file_entry(writer: Writer, path: str, data: bytes, mode: int = 0o644) -> Entry:
    put = writer.put(data)
    return Entry(
        path, Kind.FILE, mode, mtime_ns=MTIME, size=len(data), chunks=((put.chunk_id, len(data)),)
    )


def with_dirs(entries: dict[str, Entry], root: bool) -> Tree:
    for path in list(entries):
        p = path
        while "/" in p:
            p = p.rpartition("/")[0]
            if p in entries:
                break
            entries[p] = Entry(p, Kind.DIR, 0o755, mtime_ns=MTIME)
    if root:
        entries[""] = Entry("", Kind.DIR, 0o755)
    return Tree.of(entries.values())


def base_paths() -> list[str]:
    paths = []
    for i in range(BASE_FILES):
        d = i // PER_DIR
        if i < ETC_FILES:
            paths.append(f"etc/app{d:03d}/conf{i:05d}.conf")
        elif i < 40_000:
            paths.append(f"usr/share/pkg{d:03d}/f{i:05d}")
        elif i < 45_000:
            paths.append(f"usr/lib/lib{d:03d}/lib{i:05d}.so")
        else:
            paths.append(f"opt/vendor{d:03d}/f{i:05d}")
    return paths


def store_version(
    home: Home, writer: Writer, name: str, kind: str, tree: Tree, **kw: object
) -> str:
    imported = store_manifest(writer, tree)
    with home.session() as session:
        return svc.add_version(
            session,
            name=name,
            kind=kind,
            new=NewVersion(imported.manifest_id, imported.files, imported.size, 0, "bench"),
            **kw,  # type: ignore[arg-type]
        ).ref


def setup(home: Home) -> None:
    rng = random.Random(7)
    paths = base_paths()
    etc = paths[:ETC_FILES]
    rest = paths[ETC_FILES:]
    with home.store.writer() as writer:
        v1 = {
            p: file_entry(writer, p, conf(i) if i < ETC_FILES else blob(i, "base"))
            for i, p in enumerate(paths)
        }
        store_version(home, writer, "base", APP, with_dirs(dict(v1), True))
        patched = rng.sample(range(BASE_FILES), PATCHED - 100)
        v2 = dict(v1)
        for i in patched[:4_800]:
            p = paths[i]
            v2[p] = file_entry(
                writer, p, conf(i, "patched") if i < ETC_FILES else blob(i, "patched")
            )
        for i in patched[4_800:]:
            del v2[paths[i]]
        for k in range(100):
            p = f"usr/lib/new/added{k:03d}.so"
            v2[p] = file_entry(writer, p, blob(k, "added"))
        store_version(home, writer, "base", APP, with_dirs(v2, True))
        writer.flush()
        for first in range(0, LAYERS, 100):  # a transaction per 100 layers
            writer.flush()
            with home.session() as session:
                on = [svc.get_version(session, parse_ref("base@1"))]
                for n in range(first, min(first + 100, LAYERS)):
                    tree = with_dirs(user_changes(writer, rng, n, etc, rest), False)
                    imported = store_manifest(writer, tree)
                    svc.add_version(
                        session,
                        name=f"user{n:04d}",
                        kind=WRITABLE,
                        new=NewVersion(
                            imported.manifest_id, imported.files, imported.size, 0, "bench"
                        ),
                        bases=on,
                        policy="all",
                    )


def user_changes(
    writer: Writer, rng: random.Random, n: int, etc: list[str], rest: list[str]
) -> dict[str, Entry]:
    """200 changed files: 120 new in the home, 40 /etc with a line added, 30 replaced
    elsewhere, 10 deleted."""
    user: dict[str, Entry] = {}
    for k in range(120):
        p = f"home/u{n:04d}/docs/d{k // 40}/note{k:03d}.txt"
        user[p] = file_entry(writer, p, f"user {n} note {k}\n".encode() * (4 + k % 30))
    for p in rng.sample(etc, 40):
        user[p] = file_entry(writer, p, conf(int(p[-10:-5])) + f"u{n} = yes\n".encode())
    for k, p in enumerate(rng.sample(rest, 40)):
        if k < 30:
            user[p] = file_entry(writer, p, f"user {n} build of {p}\n".encode() * 6)
        else:
            user[p] = Entry(p, Kind.WHITEOUT, 0)
    return user


def main() -> None:
    work = scratch("rebase")
    home = init_home(work / "home").home
    started = time.perf_counter()
    setup(home)
    built = time.perf_counter() - started
    cmd = [LAMINA, "rebase", "--all", "--from", "base@1", "--onto", "base@2", "--json"]
    env = {"LAMINA_HOME": str(home.root)}
    started = time.perf_counter()
    out = run(*cmd, env=env)
    seconds = time.perf_counter() - started
    result = json.loads(out)
    done = result["counts"].get("rebased", 0)
    if done != LAYERS:
        raise SystemExit(f"rebased {done} of {LAYERS}: {result['counts']}")
    print(f"rebase {done} layers in {seconds:.1f} s, {done / seconds:.1f} layers/s")
    layers = result["layers"]
    merged = sum(r["counts"]["merged"] for r in layers)
    conflicts = sum(r["counts"]["conflict"] for r in layers)
    kept = sum(r["counts"]["kept"] for r in layers)
    print(
        f"per layer: {kept / done:.0f} kept, {merged / done:.1f} merged, "
        f"{conflicts / done:.1f} conflicts (the patch changed "
        f"{layers[0]['counts']['update_changed']} paths); {os.cpu_count()} cores"
    )
    again = time.perf_counter()
    skipped = json.loads(run(*cmd, env=env))["counts"]
    print(f"re-run: {skipped} in {time.perf_counter() - again:.1f} s; setup {built:.0f} s")
    home.close()


if __name__ == "__main__":
    main()
