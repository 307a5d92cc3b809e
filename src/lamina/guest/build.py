"""``lamina image build NAME --debian SUITE``: a golden image from Debian's packages, with
the guest kit, imported as ``NAME@N`` (and its root as layer ``NAME@M``, the base apps
are captured on).

Steps: mmdebstrap the root from this host's apt sources (``lamina.guest.debian``), put
the guest kit in (``lamina.guest.kit``), make the bootable disk (``lamina.guest.disk``),
import it; then import the root file system from the disk itself as a layer (what the
machines run is exactly what apps are captured on).

Caching, in three levels: downloaded packages are kept between builds (apt fetches only
what changed); the bootstrapped root, as a tar file, by the digest of what made it
(release, packages, apt sources), so a change of lamina's code costs the kit and the disk,
not the bootstrap; and each finished disk, by the digest of everything that went into it
(the root's inputs, size, the kit: lamina's own code and its dependency pins), so a build
whose inputs were built before imports the cached disk at once. Builds sharing a cache
directory wait for each other; old entries are removed, two of each kind are kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lamina.demo.image import PART_START, loop_mount
from lamina.guest import debian, disk, kit, pyenv
from lamina.home import Home
from lamina.names import check_name

Log = Callable[[str], None]
Progress = Callable[[int], None]
# Bump when what a build makes changes in a way the inputs below do not show.
RECIPE = 1


@dataclass(frozen=True)
class Spec:
    name: str
    suite: str = "bookworm"
    include: tuple[str, ...] = ()
    size: int = 4 * disk.GiB
    layer: bool = True  # also import the root as layer NAME

    @property
    def packages(self) -> list[str]:
        return sorted({*debian.PACKAGES, *self.include})


@dataclass
class Built:
    image: str  # NAME@N
    layer: str | None  # NAME@M
    disk: str  # the cached disk file
    key: str
    cached: bool
    kernel: str
    packages: list[str]
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)


def kit_digest() -> str:
    """Everything of the kit that ends up in an image: lamina's code, the kit's files, the
    dependency pins."""
    h = hashlib.sha256()
    source = pyenv.lamina_source()
    for path in sorted(source.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            h.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes())
    files = resources.files("lamina.guest") / "files"
    for item in sorted(files.iterdir(), key=lambda i: i.name):
        h.update(item.name.encode() + b"\0" + item.read_bytes())
    h.update("\n".join(pyenv.pins() + pyenv.requirements()).encode())
    return h.hexdigest()


def build_key(spec: Spec, mirrors: list[str]) -> str:
    facts = {
        "recipe": RECIPE,
        "suite": spec.suite,
        "packages": spec.packages,
        "size": spec.size,
        "sources": mirrors,
        "base": spec.name if spec.layer else None,
        "kit": kit_digest(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _make(spec: Spec, key: str, mirrors: list[str], cache: Path, log: Log) -> dict[str, Any]:
    """Build the disk into the cache; returns its facts."""
    steps: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
        work = Path(tmp)
        root = work / "root"
        started = time.monotonic()
        tarball = _root_tarball(spec, mirrors, cache, log)
        debian.extract(tarball, root)
        steps["bootstrap"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        kit.install(root, base=spec.name if spec.layer else None, cache=cache / "python", log=log)
        steps["kit"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        kernel = debian.kernel_version(root)
        disk.make(work / "disk.img", root, spec.size, key, log)
        steps["disk"] = round(time.monotonic() - started, 1)
        image, meta = _entry(cache, key)
        os.replace(work / "disk.img", image)
    facts = {"kernel": kernel, "packages": spec.packages, "steps": steps}
    meta.write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def root_tarball(spec: Spec, mirrors: list[str], cache: Path) -> Path:
    """Where the bootstrapped root of ``spec`` is kept: one per (release, packages, sources)."""
    facts = {"recipe": RECIPE, "suite": spec.suite, "packages": spec.packages, "sources": mirrors}
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    return cache / f"root-{spec.suite}-{key[:24]}.tar"


def _root_tarball(spec: Spec, mirrors: list[str], cache: Path, log: Log) -> Path:
    """The bootstrapped root of ``spec`` as a tar file, made once."""
    tarball = root_tarball(spec, mirrors, cache)
    if tarball.exists():
        log(f"using the Debian {spec.suite} root bootstrapped before ({tarball.name})")
        os.utime(tarball)  # the newest stays in the cache
        return tarball
    log(f"bootstrapping Debian {spec.suite} ({len(spec.packages)} packages and what they need)")
    partial = cache / f".{tarball.stem}.partial.tar"
    try:
        debian.bootstrap(partial, spec.suite, spec.packages, mirrors, cache / "debs", log)
        os.replace(partial, tarball)
    finally:
        partial.unlink(missing_ok=True)
    return tarball


def _entry(cache: Path, key: str) -> tuple[Path, Path]:
    stem = cache / f"image-{key[:24]}"
    return stem.with_suffix(".img"), stem.with_suffix(".json")


def build(
    home: Home,
    spec: Spec,
    *,
    cache: Path | None = None,
    rebuild: bool = False,
    log: Log,
    progress: Callable[[str, int], Progress] | None = None,
) -> Built:
    """Build (or take from the cache) the image of ``spec`` and import it into ``home``."""
    check_name(spec.name, "image name")
    debian.check_suite(spec.suite)
    debian.check_packages(spec.include)
    started = time.monotonic()
    cache = cache if cache is not None else home.cache_dir / "images"
    mirrors = debian.sources(spec.suite)
    key = build_key(spec, mirrors)
    with _locked(cache):
        image, meta = _entry(cache, key)
        cached = image.exists() and meta.exists() and not rebuild
        if cached:
            log(f"using the image built before with the same inputs ({image.name})")
            facts = json.loads(meta.read_text())
        else:
            facts = _make(spec, key, mirrors, cache, log)
            cleanup(cache)
        steps = dict(facts.get("steps", {})) if not cached else {}
        t = time.monotonic()
        image_ref = _import_image(home, spec.name, image, progress)
        steps["import image"] = round(time.monotonic() - t, 1)
        layer_ref = None
        if spec.layer:
            t = time.monotonic()
            layer_ref = _import_layer(home, spec.name, image, log, progress)
            steps["import layer"] = round(time.monotonic() - t, 1)
    return Built(
        image=image_ref,
        layer=layer_ref,
        disk=str(image),
        key=key,
        cached=cached,
        kernel=facts["kernel"],
        packages=facts["packages"],
        seconds=round(time.monotonic() - started, 1),
        steps=steps,
    )


def _import_image(
    home: Home, name: str, image: Path, progress: Callable[[str, int], Progress] | None
) -> str:
    from lamina.image.importer import import_and_commit
    from lamina.manager.services import images

    def commit(imported: Any) -> str:
        with home.session() as session:
            return images.add_version(session, name=name, imported=imported, source=str(image)).ref

    advance = progress(f"import image {name}", image.stat().st_size) if progress else None
    ref, _ = import_and_commit(
        home.store, image, commit, fmt="raw", tmp_dir=home.tmp_dir, progress=advance
    )
    return ref


def _import_layer(
    home: Home,
    name: str,
    image: Path,
    log: Log,
    progress: Callable[[str, int], Progress] | None,
) -> str:
    """The image's root file system as layer ``name``: read from the disk itself."""
    from lamina.layer.importer import import_layer
    from lamina.manager.layer_records import DatabaseRecords

    size = image.stat().st_size - PART_START
    with (
        tempfile.TemporaryDirectory(prefix="layer-", dir=home.tmp_dir) as tmp,
        loop_mount(image, PART_START, size, Path(tmp) / "root", read_only=True) as root,
    ):
        log(f"importing the root file system as layer {name}")
        total = disk.tree_bytes(root)
        advance = progress(f"import layer {name}", total) if progress else None
        ref, _ = import_layer(
            home,
            DatabaseRecords(home),
            name,
            root,
            allow_devices=True,
            allow_setuid=True,
            progress=advance,
        )
    return ref


def describe(built: Built) -> dict[str, Any]:
    return asdict(built)


def cleanup(cache: Path, keep: int = 2) -> list[Path]:
    """Remove all but the ``keep`` newest cached disks and roots (each is GBs)."""
    gone = []
    for pattern in ("image-*.img", "root-*.tar"):
        found = sorted(cache.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in found[keep:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
            gone.append(old)
    return gone
