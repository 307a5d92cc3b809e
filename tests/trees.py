"""Helpers for tests that make layers: file trees, tars, image archives, mounts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from hashlib import sha256
from pathlib import Path

import pytest

from lamina.layer.overlay import mountinfo

MiB = 1 << 20
MTIME_NS = 1_600_000_000_123_456_789
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: mounts, other owners, devices"
)
BUSYBOX = shutil.which("busybox")
APPLETS = ("sh", "echo", "cat", "mkdir", "rm", "ls", "sleep", "touch", "mv")


def write_tree(root: Path, files: dict[str, str | bytes | None]) -> Path:
    """Files (text or bytes) and directories (None) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return root


def rich_tree(root: Path) -> Path:
    """Every kind of thing a layer must keep."""
    write_tree(
        root,
        {
            "etc/app.conf": "key=value\n",
            "etc/empty": b"",
            "usr/bin/tool": b"\x7fELF" + os.urandom(3 * MiB) + bytes(12 * MiB),  # CDC + holes
            "var/mail": None,
            "srv/data/one": "1",
        },
    )
    os.chown(root / "etc/app.conf", 1234, 5678)
    os.chmod(root / "etc/app.conf", 0o640)
    os.chmod(root / "usr/bin/tool", 0o755)
    os.chmod(root / "var/mail", 0o2775)
    os.link(root / "srv/data/one", root / "srv/data/two")
    (root / "usr/bin/alias").symlink_to("tool")
    (root / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")
    os.mkfifo(root / "srv/fifo")
    os.setxattr(root / "etc/app.conf", "user.origin", b"lamina")
    os.setxattr(root / "usr/bin/tool", "security.capability", bytes.fromhex("01000002" + "00" * 16))
    for path in [root / "etc/app.conf", root / "usr/bin/tool", root / "srv/data"]:
        os.utime(path, ns=(MTIME_NS, MTIME_NS))
    os.utime(root / "etc/localtime", ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    return root


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """What a reader can see of every path: kind, mode, owner, mtime, content, xattrs."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                content: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
            else:
                content = None
            xattrs = {
                k: os.getxattr(path, k, follow_symlinks=False)
                for k in os.listxattr(path, follow_symlinks=False)
            }
            mtime = (
                st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else None
            )  # dirs change as we write
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                mtime,
                content,
                xattrs,
            )
    return out


def busybox_root(root: Path, extra: dict[str, str | bytes | None] | None = None) -> Path:
    """A minimal root filesystem: static busybox, a few applets, /etc, /home, /tmp."""
    assert BUSYBOX is not None, "busybox-static is needed (make install)"
    write_tree(
        root, {"bin": None, "etc/motd": "welcome\n", "home/alice/notes": "hi\n", "tmp": None}
    )
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    write_tree(root, extra or {})
    return root


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(
    name: str, data: bytes | None = None, **attrs: object
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    info.mtime = 1_700_000_000
    if data is None and "type" not in attrs:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def oci_layout(out: Path, layers: list[bytes], algorithm: str = "sha256") -> Path:
    """An OCI image layout directory with the given layer tars (stored as given), its
    blobs named by ``algorithm`` digests."""
    blobs = out / "blobs" / algorithm
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> str:
        digest = hashlib.new(algorithm, data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"{algorithm}:{digest}"

    config = blob(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}')
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(data)}
            for data in layers
        ],
    }
    raw = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": blob(raw),
                "size": len(raw),
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index))
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return out


def docker_archive(out: Path, layers: list[bytes]) -> Path:
    """A ``docker save`` archive (legacy layout: <id>/layer.tar + manifest.json)."""
    members = []
    names = []
    for data in layers:
        digest = sha256(data).hexdigest()
        names.append(f"{digest}/layer.tar")
        members += [member(digest), member(f"{digest}/layer.tar", data)]
    manifest = json.dumps([{"Config": "c.json", "RepoTags": ["app:1"], "Layers": names}])
    members += [member("c.json", b"{}"), member("manifest.json", manifest.encode())]
    out.write_bytes(tar_bytes(members))
    return out


def mounted(path: Path) -> bool:
    return any(m.mountpoint == str(path) for m in mountinfo())
