"""Layer versions attached lazily: usable here once their metadata is, their data read
from the manager when first needed (``lamina.stream.layerfile``).

For version ``M`` (its tree manifest id), the host keeps:

    cache/lazy/<image id>/              the stream cache of the version's EROFS image (the
                                        manifest, verified chunks, status.json, profile)
    cache/layers/<M>.erofs              a FUSE file serving that image (an empty file while
                                        no server runs), which ``lamina.layer.prepare``
                                        mounts as it mounts a built image
    cache/layers/<M>.fp                 the tree's fingerprint, from the tree manifest

So everything above the image (overlay composition, live attach, capture, rebase) is
unchanged; a version whose image is complete behaves as a built one. A server stopped
(reboot, crash) is started again on the next use, on the cache it left: whatever it had
read is there, offline or not.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lamina.errors import CorruptObject, LaminaError, ToolError
from lamina.files import write_atomic
from lamina.home import Home
from lamina.image import profile as profiles
from lamina.layer import prepare
from lamina.layer.conflicts import Fingerprint
from lamina.layer.overlay import mounted_at
from lamina.layer.tree import Tree
from lamina.manager.client import ManagerClient
from lamina.store import codec
from lamina.stream import cache
from lamina.stream.cache import StreamConfig

BUILD_WITHIN = 1800.0
READY_WITHIN = 20.0  # seconds for a server to mount its file (Python's start: ~0.3 s idle)


def lazy_dir(home: Home) -> Path:
    return home.root / "cache" / "lazy"


def image_file(home: Home, manifest_id: bytes) -> Path:
    return prepare.cache_dir(home.root) / f"{manifest_id.hex()}.erofs"


def _link(home: Home, manifest_id: bytes) -> Path:
    """Which image cache serves version ``manifest_id`` (a file naming the image id)."""
    return prepare.cache_dir(home.root) / f"{manifest_id.hex()}.lazy"


def _token(client: ManagerClient) -> str:
    return str(client.http.headers.get("Authorization", "")).removeprefix("Bearer ")


def attach(
    home: Home, client: ManagerClient, layer: dict[str, Any], tree: Tree, *, ca: Path | None = None
) -> dict[str, Any]:
    """Make version ``layer`` ({name, version, manifest}) mountable here, fetching only
    its image's manifest and read-ahead profile; returns the image's description."""
    name, version, manifest = layer["name"], int(layer["version"]), layer["manifest"]
    # The first demand of a version builds its image on the manager: a minute for 2 GiB.
    path = f"/layers/{name}/versions/{version}/image"
    info: dict[str, Any] = client.json("GET", path, timeout=BUILD_WITHIN)
    if info.get("manifest") != manifest:
        raise CorruptObject(f"image of {name}@{version} is for another tree manifest")
    image_id = bytes.fromhex(info["image"])
    root = lazy_dir(home) / image_id.hex()
    if not (root / "config.json").exists():
        body = client.request("GET", f"/chunks/{image_id.hex()}").content
        manifest_bytes = codec.decode(body, expected=image_id)
        root.mkdir(parents=True, exist_ok=True)
        config = StreamConfig(
            url=client.url,
            image=name,
            version=version,
            manifest_id=image_id,
            size=int(info["size"]),
            chunk_size=int(info["chunk_size"]),
            token=_token(client),
            mode="layer",
        )
        cache.create(root, config, manifest_bytes)
        cache.keep_ca(root, ca)
    if info.get("profile"):
        write_atomic(root / "readahead", profiles.encode(info["profile"]))
    mid = bytes.fromhex(manifest)
    prepare.cache_dir(home.root).mkdir(parents=True, exist_ok=True)
    write_atomic(_link(home, mid), image_id.hex().encode())
    write_atomic(image_file(home, mid).with_suffix(".fp"), Fingerprint.of(tree).to_bytes())
    serve(home, mid)
    return info


def cache_root(home: Home, manifest_id: bytes) -> Path | None:
    link = _link(home, manifest_id)
    if not link.exists():
        return None
    return lazy_dir(home) / link.read_text().strip()


def serve(home: Home, manifest_id: bytes) -> bool:
    """Start the server of a lazily attached version unless one runs; False when the
    version is not attached lazily here."""
    root = cache_root(home, manifest_id)
    if root is None:
        return False
    target = image_file(home, manifest_id)
    if mounted_at(target) is not None:
        return True
    if not target.exists():
        target.touch(mode=0o444)
    log = open(root / "log", "ab")  # noqa: SIM115 (handed to the child)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lamina.stream.layerfile", str(root), str(target)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # outlives the agent: the layer stays mounted
            close_fds=True,
        )
    finally:
        log.close()
    assert proc.stdout is not None
    try:
        _wait_ready(proc, root)
    finally:
        proc.stdout.close()
        proc.wait()  # the server forked away from it at once
    return True


def _wait_ready(proc: subprocess.Popen[bytes], root: Path) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_WITHIN
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if ready:
            line = proc.stdout.readline()
            if line.strip() == b"ready":
                return
            if not line:
                break
    with contextlib.suppress(ProcessLookupError):  # the server: in the group it leads
        os.killpg(proc.pid, signal.SIGKILL)
    tail = (root / "log").read_bytes()[-300:].decode(errors="replace").strip().splitlines()
    raise ToolError(f"layer file server did not start: {tail[-1] if tail else proc.poll()}")


def status(home: Home) -> list[dict[str, Any]]:
    """Each lazily attached image's figures: what it holds, whether the manager is away,
    how many chunks reads asked for and could not get."""
    out: list[dict[str, Any]] = []
    base = lazy_dir(home)
    if not base.is_dir():
        return out
    for root in sorted(base.iterdir()):
        path = root / "status.json"
        try:
            figures = cache.offline_status(root) | {"offline": None}
            if path.exists():
                import json

                figures = json.loads(path.read_text())
                figures["running"] = _alive(int(figures.get("pid", 0)))
        except (OSError, ValueError, LaminaError):
            continue
        out.append({"cache": root.name, **figures})
    return out


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def upload_profiles(home: Home, client: ManagerClient) -> int:
    """Send each lazily attached version's first-read order to the manager, once it grew
    since the last time (for the layer's read-ahead profile); how many were sent."""
    sent = 0
    base = lazy_dir(home)
    for root in sorted(base.iterdir()) if base.is_dir() else []:
        path, mark = root / "profile", root / "profile.sent"
        if not path.exists():
            continue
        blob = path.read_bytes()
        if not blob or (mark.exists() and mark.stat().st_size >= len(blob)):
            continue
        config = cache.read_config(root)
        url = f"/layers/{config.image}/versions/{config.version}/profile"
        client.json("PUT", url, json={"chunks": profiles.decode(blob)})
        write_atomic(mark, blob)
        sent += 1
    return sent
