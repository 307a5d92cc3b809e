"""Live attach of an app layer of 1,000 and of 50,000 files, against copying the larger in.

A root is mounted with a base, a small app layer (so attaching runs the conflict check
between app layers) and a writable layer, with a process holding its working directory
inside. Attach and detach are called the way the agent calls them (``lamina.layer.attach``
in a running process), and timed end to end: database, conflict check, overlay switch.
First-time preparation of each layer on this host (tree written out, mkfs.erofs) is timed
separately, and so is the ``lamina attach`` command (a fresh Python process each time).

Prints ``attach 1k=… ms 50k=… ms copy=… ms`` first. Target: attach < 100 ms, flat.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from common import LAMINA, median, need, run, scratch
from lamina.home import Home
from lamina.layer import attach, prepare, roots
from lamina.layer.importer import import_layer, load_tree
from lamina.manager.home import init_home
from lamina.manager.layer_records import DatabaseRecords

ROUNDS = 7
PER_DIR = 100


def make_tree(root: Path, files: int, tag: str) -> Path:
    """``files`` small files (200-2,000 bytes) in directories of 100."""
    for i in range(files):
        d = root / "opt" / tag / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06d}").write_bytes(f"{tag} {i}\n".encode() * (20 + i % 180))
    return root


def prepared_seconds(home: Home, ref: str) -> float:
    """First-time preparation of a version on this host (image built, then mounted)."""
    from lamina.manager.services import layers
    from lamina.names import parse_ref

    with home.session() as session:
        manifest_id = bytes.fromhex(layers.get_version(session, parse_ref(ref)).manifest_id)
    started = time.perf_counter()
    prepare.prepare(home.root, home.store, manifest_id, lambda: load_tree(home.store, manifest_id))
    return time.perf_counter() - started


def attach_ms(home: Home, root: Path, layer: str) -> tuple[float, float]:
    """Median attach and detach times over ROUNDS, in ms."""
    records = DatabaseRecords(home)
    attached, detached = [], []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        attach.attach(home, records, root, layer)
        attached.append(time.perf_counter() - started)
        assert (root / "opt" / layer).is_dir()
        started = time.perf_counter()
        attach.detach(home, records, root, layer)
        detached.append(time.perf_counter() - started)
    return median(attached) * 1000, median(detached) * 1000


def cli_attach_ms(home: Home, root: Path, layer: str) -> float:
    env = {"LAMINA_HOME": str(home.root)}
    started = time.perf_counter()
    run(LAMINA, "attach", str(root), layer, env=env)
    elapsed = time.perf_counter() - started
    run(LAMINA, "detach", str(root), layer, env=env)
    return elapsed * 1000


def main() -> None:
    need("mkfs.erofs", "cp")
    if os.geteuid() != 0:
        raise SystemExit("bench/attach.py mounts overlays: run it as root")
    base = scratch("attach")
    home = init_home(base / "home").home
    sources = {
        "base": make_tree(base / "src-base", 200, "base"),
        "tools": make_tree(base / "src-tools", 100, "tools"),
        "app1k": make_tree(base / "src-1k", 1_000, "app1k"),
        "app50k": make_tree(base / "src-50k", 50_000, "app50k"),
    }
    imported = {}
    for name, src in sources.items():
        started = time.perf_counter()
        import_layer(home, DatabaseRecords(home), name, src)
        imported[name] = time.perf_counter() - started
    prep = {name: prepared_seconds(home, name) for name in sources}
    root = base / "root"
    root.mkdir()
    roots.mount(home, DatabaseRecords(home), root, ["tools", "base"], writable="bench-user")
    holder = subprocess.Popen(["sleep", "3600"], cwd=root / "opt")  # a busy root
    try:
        a1k, d1k = attach_ms(home, root, "app1k")
        a50k, d50k = attach_ms(home, root, "app50k")
        cli1k, cli50k = cli_attach_ms(home, root, "app1k"), cli_attach_ms(home, root, "app50k")
    finally:
        holder.kill()
        holder.wait()
    copy_dir = root / "copied"
    started = time.perf_counter()
    subprocess.run(["cp", "-a", f"{sources['app50k']}/.", str(copy_dir)], check=True)
    copy_ms = (time.perf_counter() - started) * 1000
    shutil.rmtree(copy_dir)
    roots.umount(home, DatabaseRecords(home), root)
    home.close()
    print(f"attach 1k={a1k:.1f} ms 50k={a50k:.1f} ms copy={copy_ms:.0f} ms")
    print(f"ratio copy/attach 50k={copy_ms / a50k:.0f} attach 50k/1k={a50k / a1k:.2f}")
    print(f"detach 1k={d1k:.1f} ms 50k={d50k:.1f} ms (median of {ROUNDS}, in process)")
    print(f"lamina attach command 1k={cli1k:.0f} ms 50k={cli50k:.0f} ms (a fresh process)")
    print(
        f"first-time preparation on this host 1k={prep['app1k']:.2f} s "
        f"50k={prep['app50k']:.2f} s; import 1k={imported['app1k']:.2f} s "
        f"50k={imported['app50k']:.2f} s"
    )
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
