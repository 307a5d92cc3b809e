"""``layer capture``: run an installer on some layers, keep only what it changed.

The packaging machine of App Volumes: the command runs chrooted into an overlay of the
``--on`` layers (``lamina.layer.sandbox``), its writes go to a fresh upper directory, and
that upper directory, read the way overlayfs wrote it (deleted paths as whiteouts,
replaced directories as opaque), becomes the new layer version. The layers it ran on are
recorded as its bases. A command that fails stores nothing.

Package managers' caches (apt's downloaded lists and archives, dnf's and yum's, pip's)
are what an installer leaves behind, not what it installed: they are left out of the
layer unless ``keep_caches`` (a captured ``apt-get install cowsay`` was 161 MiB with them,
of which cowsay was 348 KiB). What the upper directory has there is removed before it
is read, so the base's own files at those paths stay as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import ToolError, UsageError
from lamina.home import Home
from lamina.layer import roots
from lamina.layer.importer import Imported, import_tree, new_version, scan
from lamina.layer.records import APP, LayerRecords
from lamina.layer.sources import DirSource
from lamina.layer.writable import CHANGES
from lamina.names import check_name

# Below these directories everything is a cache (the directories themselves are kept).
CACHES = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/dnf",
    "var/cache/yum",
    "var/cache/zypp",
    "var/cache/pacman/pkg",
    "var/cache/apk",
    "root/.cache/pip",
)


@dataclass(frozen=True, slots=True)
class Captured:
    ref: str
    imported: Imported
    bases: list[str]
    prepared: dict[str, float]
    left_out: int = 0  # bytes of package-manager caches not stored


def drop_caches(upper: Path) -> int:
    """Remove what lies below the cache directories in an upper directory; the bytes of
    the files removed."""
    freed = 0
    for rel in CACHES:
        top = upper / rel
        if not top.is_dir() or top.is_symlink():
            continue
        for child in list(top.iterdir()):
            if child.is_dir() and not child.is_symlink():
                for dirpath, _dirs, files in os.walk(child):
                    freed += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files)
                shutil.rmtree(child)
            else:
                freed += child.lstat().st_size
                child.unlink()
    return freed


def capture(
    home: Home,
    records: LayerRecords,
    name: str,
    on: Sequence[str],
    command: Sequence[str],
    *,
    keep_caches: bool = False,
) -> Captured:
    """Run ``command`` on the ``on`` layers; store its changes as the next version of
    ``name`` (an app layer)."""
    check_name(name, "layer name")
    if not on:
        raise UsageError("capture needs at least one --on LAYER")
    if not command:
        raise UsageError("capture needs a command after --")
    stack = records.versions(on)
    timings: dict[str, float] = {}
    lowers = [roots.prepare_version(home, v, timings) for v in stack]
    work = home.tmp_dir / f"capture-{uuid.uuid4().hex[:12]}"
    try:
        for sub in ("upper", "work", "root"):
            (work / sub).mkdir(parents=True)
        config = {
            "lowers": [str(p) for p in lowers],
            "upper": str(work / "upper"),
            "work": str(work / "work"),
            "root": str(work / "root"),
            "command": list(command),
        }
        (work / "config.json").write_text(json.dumps(config))
        sandbox = [sys.executable, "-m", "lamina.layer.sandbox", str(work / "config.json")]
        # The command's output is progress: on stderr, so stdout carries only the result.
        code = subprocess.run(sandbox, check=False, stdout=sys.stderr).returncode
        if code != 0:
            raise ToolError(f"{command[0]} exited with status {code}: nothing was stored")
        left_out = 0 if keep_caches else drop_caches(work / "upper")
        source = DirSource(work / "upper", changes=True)
        built = scan(source, CHANGES, root=False)

        def commit(imported: Imported) -> str:
            new = new_version(imported, "capture: " + " ".join(command))
            return records.add_version(name=name, kind=APP, new=new, bases=stack)

        ref, imported = import_tree(home.store, source, commit, built=built)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        roots.release(home, records)
    return Captured(ref, imported, [v.ref for v in stack], timings, left_out)
