"""Each layer version made mountable once per host, and mounted once per host.

Preparing a version writes its tree out and packs it with ``mkfs.erofs`` into
``<home>/cache/layers/<manifest>.erofs`` (keyed by manifest, so identical versions share
one image), beside its fingerprint (``.fp``, see ``conflicts.Fingerprint``). This costs time
in proportion to the layer's size, once.

The image is then mounted read-only, file-backed (Linux 6.12+: no loop device, no copy),
at ``<home>/run/layers/<manifest>``, and that one mount is the lower layer of every
overlay on the host that uses the version: one page cache for all of them, and a mount
costs the same for 1,000 files as for 50,000. On older kernels the image goes through a
loop device instead.

A version may instead be *provided*: its tree is already on this host as a directory (a
machine's running system is the base layer it was built as, see ``lamina.guest.session``);
then that directory is its lower layer, and nothing is built or mounted for it.

mkfs.erofs (erofs-utils 1.5) options: ``--preserve-mtime`` keeps per-file mtimes (without
it, files whose mtime differs from the build time get the build time when compact inodes
are chosen); data is left uncompressed, trading cache disk space for reads that cost no
CPU; xattrs (security.capability, trusted.overlay.opaque) are kept by default.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import ToolError
from lamina.layer import mountapi
from lamina.layer.conflicts import Fingerprint
from lamina.layer.materialize import materialize
from lamina.layer.overlay import mounted_at, mountinfo
from lamina.layer.tree import Tree
from lamina.locks import locked
from lamina.store import ChunkStore

MKFS = "mkfs.erofs"
Loader = Callable[[], Tree]


@dataclass(frozen=True, slots=True)
class Prepared:
    manifest_id: bytes
    image: Path
    mountpoint: Path
    prepared_seconds: float  # 0.0 when the image was already there


_provided: dict[bytes, Path] = {}


def provide(manifest_id: bytes, directory: Path) -> None:
    """Use ``directory`` as the tree of version ``manifest_id`` in this process."""
    _provided[manifest_id] = directory


def provided(manifest_id: bytes) -> Path | None:
    return _provided.get(manifest_id)


def cache_dir(home_root: Path) -> Path:
    return home_root / "cache" / "layers"


def run_dir(home_root: Path) -> Path:
    return home_root / "run" / "layers"


def mountpoint(home_root: Path, manifest_id: bytes) -> Path:
    """Where the host mounts a layer version's image (its files and folders are named by
    the manifest id in hex)."""
    return run_dir(home_root) / manifest_id.hex()


def mkfs(source: Path, image: Path) -> None:
    if shutil.which(MKFS) is None:
        raise ToolError(f"{MKFS} not found (install erofs-utils)")
    cmd = [MKFS, "--quiet", "--preserve-mtime", str(image), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ToolError(f"{MKFS} failed: {detail[-1] if detail else proc.returncode}")


def _tmpfs_budget() -> int:
    """A quarter of the memory available now (0 when /proc/meminfo says nothing)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 0


@contextmanager
def scratch(path: Path, tree: Tree) -> Iterator[None]:
    """Write the tree out in memory when it fits: creating 50,000 small files took 3.3 s on
    tmpfs and 8.7-29 s on this VM's ext4 (depending on the disk's other load), while
    mkfs.erofs reads either in 1.5-1.8 s. A tree that would take more than a quarter of
    the available memory is written to disk."""
    need = tree.data_bytes + 4096 * len(tree) + (16 << 20)
    mounted = False
    if need < _tmpfs_budget():
        try:
            mountapi.mount("tmpfs", path, "tmpfs", mountapi.MS_NODEV, f"size={need},mode=0755")
            mounted = True
        except OSError:
            pass  # not allowed here: disk it is
    try:
        yield
    finally:
        if mounted:
            mountapi.umount(path, lazy=True)


def fingerprint(home_root: Path, manifest_id: bytes) -> Fingerprint:
    path = cache_dir(home_root) / f"{manifest_id.hex()}.fp"
    return Fingerprint.from_bytes(path.read_bytes())


def prepare_image(
    home_root: Path, store: ChunkStore, manifest_id: bytes, load: Loader
) -> tuple[Path, float]:
    """The version's EROFS image, built on first use; (path, seconds spent building)."""
    manifest = manifest_id.hex()
    cache = cache_dir(home_root)
    image = cache / f"{manifest}.erofs"
    if image.is_file() and image.with_suffix(".fp").is_file():
        return image, 0.0
    started = time.monotonic()
    with locked(cache / f"{manifest}.lock"):
        if image.is_file() and image.with_suffix(".fp").is_file():
            return image, 0.0
        work = home_root / "tmp" / f"prepare-{manifest[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            (work / "root").mkdir(parents=True)
            tree = load()
            with scratch(work / "root", tree):
                materialize(store, tree, work / "root")
                mkfs(work / "root", work / "image.erofs")
            (work / "image.fp").write_bytes(Fingerprint.of(tree).to_bytes())
            for name in ("image.erofs", "image.fp"):
                fd = os.open(work / name, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            os.replace(work / "image.fp", image.with_suffix(".fp"))
            os.replace(work / "image.erofs", image)  # last: its presence means "prepared"
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return image, time.monotonic() - started


def mount_image(home_root: Path, manifest_id: bytes, image: Path) -> Path:
    """Mount ``image`` read-only at the host's one mountpoint for it (idempotent)."""
    target = mountpoint(home_root, manifest_id)
    if mounted_at(target) is not None:
        return target
    with locked(target.with_name(f"{target.name}.lock")):
        if mounted_at(target) is not None:
            return target
        target.mkdir(parents=True, exist_ok=True)
        attrs = mountapi.MOUNT_ATTR_RDONLY | mountapi.MOUNT_ATTR_NODEV
        try:
            params = [mountapi.Param("source", str(image))]
            fd = mountapi.new_mount("erofs", params, attrs=attrs)
            try:
                mountapi.move_mount(fd, target)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTBLK, errno.EINVAL, errno.ENODEV):
                raise mountapi.tool_error(exc, f"mount {image.name}") from None
            _loop_mount(image, target)  # a kernel without file-backed EROFS
    return target


def _loop_mount(image: Path, target: Path) -> None:
    """Through a loop device, set up here (``lamina.layer.loop``), or by mount(8) on a
    kernel without ``LOOP_CONFIGURE`` (before 5.8)."""
    from lamina.layer import loop

    try:
        fd, device = loop.attach_read_only(image)
    except OSError as exc:
        if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.ENOENT):
            raise mountapi.tool_error(exc, f"loop device for {image.name}") from None
    else:
        try:
            attrs = mountapi.MOUNT_ATTR_RDONLY | mountapi.MOUNT_ATTR_NODEV
            mount = mountapi.new_mount(
                "erofs", [mountapi.Param("source", str(device)), mountapi.Param("ro")], attrs=attrs
            )
            try:
                mountapi.move_mount(mount, target)
            finally:
                os.close(mount)
        except OSError as exc:
            raise mountapi.tool_error(exc, f"mount {image.name}") from None
        finally:
            os.close(fd)  # the mount holds the device now; it is cleared with the mount
        return
    cmd = ["mount", "-t", "erofs", "-o", "ro,loop,nodev", str(image), str(target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ToolError(f"mount {image.name}: {proc.stderr.strip()}")


def prepare(home_root: Path, store: ChunkStore, manifest_id: bytes, load: Loader) -> Prepared:
    """Build (first use) and mount (once per host) a layer version's image."""
    directory = provided(manifest_id)
    if directory is not None:
        return Prepared(manifest_id, directory, directory, 0.0)
    image, seconds = prepare_image(home_root, store, manifest_id, load)
    return Prepared(manifest_id, image, mount_image(home_root, manifest_id, image), seconds)


def release_unused(home_root: Path, keep: set[bytes]) -> list[bytes]:
    """Lazily unmount the host's layer images not in ``keep`` (overlays still using one
    keep it alive until they go); returns the manifest ids released."""
    released: list[bytes] = []
    base = run_dir(home_root)
    if not base.is_dir():
        return released
    names = {m.hex() for m in keep}
    mounts = mountinfo()  # once: one read per image made this quadratic
    for child in base.iterdir():
        if child.is_dir() and child.name not in names and mounted_at(child, mounts):
            try:
                mountapi.umount(child, lazy=True)
            except OSError:
                continue
            released.append(bytes.fromhex(child.name))
    return released


def forget(home_root: Path, manifest_id: bytes) -> None:
    """Remove a version's prepared image (after its last version is gone)."""
    target = mountpoint(home_root, manifest_id)
    if mounted_at(target) is not None:
        mountapi.umount(target, lazy=True)
    image = cache_dir(home_root) / f"{manifest_id.hex()}.erofs"
    if mounted_at(image) is not None:  # a lazily attached image's file (its server ends)
        mountapi.umount(image, lazy=True)
    for suffix in (".erofs", ".fp", ".lock", ".lazy"):
        (cache_dir(home_root) / f"{manifest_id.hex()}{suffix}").unlink(missing_ok=True)
