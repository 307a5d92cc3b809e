"""The seed disk: an ISO 9660 image labelled ``cidata``, built in memory with pycdlib.

Rock Ridge gives Linux (isofs, cloud-init) the real file names, Joliet gives them to
Windows (cloudbase-init); the plain ISO 9660 names are 8.3 fallbacks nobody reads.
Timestamps are fixed, so the same files always give the same bytes and a server can
cache a seed by (machine, identity_rev) or compare it with a previous one.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace

import pycdlib

from lamina.identity.seed import SEED_LABEL

# Every timestamp in the image: 2020-01-01T00:00:00Z (0 would mean "not specified").
FIXED_TIME = 1577836800.0

_clock_lock = threading.Lock()


@contextmanager
def _fixed_clock() -> Iterator[None]:
    """Point pycdlib's ``time`` at a stopped UTC clock while one image is built.

    pycdlib stamps the volume descriptors and every directory record with time.time()
    in local time and has no option for it; swapping the module global (not time.time
    itself) leaves the rest of the process alone. The lock serializes builds, which take
    about a millisecond each.
    """
    import pycdlib.dates
    import pycdlib.headervd
    import pycdlib.pycdlib

    clock = SimpleNamespace(
        time=lambda: FIXED_TIME,
        localtime=time.gmtime,
        gmtime=time.gmtime,
        strftime=time.strftime,
        strptime=time.strptime,
        struct_time=time.struct_time,
    )
    modules = (pycdlib.pycdlib, pycdlib.headervd, pycdlib.dates)
    with _clock_lock:
        saved = [vars(m)["time"] for m in modules]
        try:
            for m in modules:
                vars(m)["time"] = clock
            yield
        finally:
            for m, original in zip(modules, saved, strict=True):
                vars(m)["time"] = original


def _short_name(name: str, taken: set[str]) -> str:
    """An ISO 9660 level 1 name (8.3, upper case) for the fallback directory record."""
    stem = re.sub(r"[^A-Z0-9_]", "", name.upper())[:8] or "FILE"
    candidate, n = stem, 0
    while candidate in taken:
        n += 1
        candidate = f"{stem[: 8 - len(str(n))]}{n}"
    taken.add(candidate)
    return f"/{candidate}.;1"


def build_seed_iso(files: Mapping[str, bytes], label: str = SEED_LABEL) -> bytes:
    """An ISO 9660 + Joliet + Rock Ridge image holding ``files``, by path: a name, or
    ``DIR/NAME`` for a file in a directory (one level, as the seed needs)."""
    iso = pycdlib.PyCdlib()
    taken: dict[str, set[str]] = {"": set()}
    dirs: dict[str, str] = {"": ""}  # real directory name -> its ISO 9660 path
    with _fixed_clock():
        iso.new(
            interchange_level=1,
            vol_ident=label,
            sys_ident="LINUX",
            app_ident_str="LAMINA",
            joliet=3,
            rock_ridge="1.09",
        )
        for path in sorted(files):
            data = files[path]
            parent, _, name = path.rpartition("/")
            if "/" in parent:
                raise ValueError(f"seed file {path!r}: only one directory level is supported")
            if parent not in dirs:
                short = _short_name(parent, taken[""]).removesuffix(".;1")
                iso.add_directory(iso_path=short, rr_name=parent, joliet_path=f"/{parent}")
                dirs[parent], taken[parent] = short, set()
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path=dirs[parent] + _short_name(name, taken[parent]),
                rr_name=name,
                joliet_path=f"/{path}",
            )
        out = io.BytesIO()
        iso.write_fp(out)
    iso.close()
    return out.getvalue()


def read_seed_iso(image: bytes) -> dict[str, bytes]:
    """The files of a seed image by their Rock Ridge paths (the inverse of the build)."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        found: dict[str, bytes] = {}
        pending = [""]
        while pending:
            directory = pending.pop()
            for child in iso.list_children(rr_path=directory or "/"):
                if child.is_dot() or child.is_dotdot():
                    continue
                path = f"{directory}/{child.rock_ridge.name().decode()}"
                if child.is_dir():
                    pending.append(path)
                    continue
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, rr_path=path)
                found[path.lstrip("/")] = out.getvalue()
        return found
    finally:
        iso.close()
