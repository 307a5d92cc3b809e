"""Streamed boot: the demo VM booting through `lamina stream` from an empty cache.

  golden      the demo disk (64 MiB: MBR, extlinux, kernel, initramfs) grown to 1 GiB
              with about 600 MiB of application files from this host's /usr in its file
              system: what a golden image carries beyond its boot path
  profile     one boot from `lamina serve` records the image's boot profile
  fetched     empty cache, on-demand reads only (--no-hydrate): chunk bytes fetched by
              the time the boot line appears, as a share of the image's data (and of its
              size); the same for the bare 64 MiB demo disk, for reference
  boot        seconds from qemu's start to the boot line: empty cache (hydration on: the
              boot profile first, the rest once the boot is over) vs a complete cache,
              alternately, 3 each; then once more with the manager stopped
  hydration   empty cache to complete, `lamina stream` (from process start) vs nbdkit's
              curl plugin with its cache filter (cache-on-read, 4 MiB blocks: its best
              setting here; its default 64 KiB once, for reference) read whole by nbdcopy,
              from the same raw image served over HTTP by a small local server, alternately

Prints ``ratio fetched_before_boot=… boot=… hydration=…``; targets: under 0.10, at
most 1.2, at least 1.0. Needs root (loop mounts, like the demo image build).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common import LAMINA, MiB, free_port, median, need, run, scratch, wait_port

GOLDEN = 1024 * MiB
PAYLOAD = 600 * MiB
PAYLOAD_FROM = ("/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/lib")
PART_START = 1 * MiB
ROUNDS = 3


# -- the golden image -------------------------------------------------------------------------


def copy_payload(dest: Path, budget: int) -> int:
    """Regular files from this host's /usr, in a fixed order, up to ``budget`` bytes."""
    total = 0
    for top in PAYLOAD_FROM:
        for root, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files):
                src = Path(root) / name
                if src.is_symlink() or not src.is_file():
                    continue
                size = src.stat().st_size
                if total + size > budget:
                    return total
                target = dest / src.relative_to("/")
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                total += size
    return total


def build_golden(demo: Path, work: Path) -> tuple[Path, int]:
    from lamina.demo.image import mbr

    golden = work / "golden.img"
    run("cp", "--sparse=always", str(demo), str(golden))
    with open(golden, "r+b") as f:
        f.truncate(GOLDEN)
        boot_code = f.read(440)
        f.seek(0)
        f.write(mbr(GOLDEN, boot_code))
    loop = run(
        "losetup", "--find", "--show", "--offset", str(PART_START),
        "--sizelimit", str(GOLDEN - PART_START), str(golden),
    ).strip()  # fmt: skip
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        run("e2fsck", "-f", "-y", loop)
        run("resize2fs", "-f", loop)
        run("mount", "-t", "ext4", loop, str(mnt))
        try:
            payload = copy_payload(mnt / "opt" / "apps", PAYLOAD)
        finally:
            run("umount", str(mnt))
    finally:
        run("losetup", "--detach", loop)
    return golden, payload


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def lamina(env: dict[str, str], *args: str) -> str:
    return run(LAMINA, *args, env=env)


def start_server(env: dict[str, str], nbd: int, http: int) -> Proc:
    proc = subprocess.Popen(
        [LAMINA, "serve", "--nbd", f"127.0.0.1:{nbd}",
         "--http", f"127.0.0.1:{http}"],
        env={**os.environ, **env}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(nbd, proc)
    wait_port(http, proc)
    return Proc(proc)


def start_stream(
    env: dict[str, str], image: str, url: str, token: str, cache: Path, *extra: str
) -> tuple[Proc, int]:
    port = free_port()
    proc = subprocess.Popen(
        [LAMINA, "stream", image, "--from", url, "--token", token, "--cache", str(cache),
         "--nbd", f"127.0.0.1:{port}", *extra],
        env={**os.environ, **env}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port, proc)
    return Proc(proc), port


def stream_status(cache: Path) -> dict[str, Any]:
    from lamina.stream.endpoint import control_address

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(control_address(cache))
        s.sendall(b'{"op": "status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            data += s.recv(65536)
    status: dict[str, Any] = json.loads(data)["status"]
    return status


def boot(disk: str, seed: str, cache: Path | None) -> tuple[float, dict[str, Any] | None]:
    """Seconds from qemu's start to the boot line, and the endpoint's status right then."""
    from lamina.demo.initramfs import BOOT_PREFIX
    from lamina.demo.vm import qemu_command

    started = time.monotonic()
    proc = subprocess.Popen(
        qemu_command(disk, seed), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    tail: list[bytes] = []
    try:
        for raw in proc.stdout:
            tail = [*tail[-4:], raw]
            if raw.startswith(BOOT_PREFIX.encode()):
                seconds = time.monotonic() - started
                status = stream_status(cache) if cache is not None else None
                if b"error=" in raw:
                    raise SystemExit(f"the VM failed: {raw.decode().strip()}")
                return seconds, status
        proc.wait(timeout=60)
        assert proc.stderr is not None
        why = b" | ".join([*tail, proc.stderr.read()[-500:]]).decode(errors="replace")
        raise SystemExit(f"the VM printed no boot line: {why}")
    finally:
        if proc.poll() is None:
            proc.wait(timeout=60)  # it powers itself off after the line
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


# -- the HTTP side of the nbdkit comparison ----------------------------------------------------


def serve_file(path: Path) -> tuple[ThreadingHTTPServer, int]:
    """GET with Range on one file, sent with sendfile(2)."""
    size = path.stat().st_size

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _head(self) -> tuple[int, int]:
            spec = self.headers.get("Range", "")
            if spec.startswith("bytes="):
                first, _, last = spec[6:].partition("-")
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                start, end = 0, size - 1
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            return start, end - start + 1

        def do_HEAD(self) -> None:
            self._head()

        def do_GET(self) -> None:
            offset, count = self._head()
            with open(path, "rb") as f:
                while count > 0:
                    sent = os.sendfile(self.wfile.fileno(), f.fileno(), offset, count)
                    offset += sent
                    count -= sent

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def nbdkit_seconds(url: str, work: Path, block: str) -> float:
    cache_dir = work / "nbdkit-cache"
    cache_dir.mkdir(exist_ok=True)
    started = time.monotonic()
    subprocess.run(
        ["nbdkit", "-U", "-", "--filter=cache", "curl", f"url={url}", "cache-on-read=true",
         f"cache-min-block-size={block}", "--run", 'nbdcopy "$uri" null:'],
        check=True, env={**os.environ, "TMPDIR": str(cache_dir)},
    )  # fmt: skip
    return time.monotonic() - started


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Setup:
    work: Path
    env: dict[str, str]
    token: str
    manager: str
    seed: str
    nbd: int
    payload: int
    golden: Path

    def stream(self, image: str, cache: str, *extra: str) -> tuple[Proc, int, Path]:
        path = self.work / cache
        proc, port = start_stream(self.env, image, self.manager, self.token, path, *extra)
        return proc, port, path


def prepare(work: Path) -> tuple[Setup, Proc]:
    from lamina.demo import demo_image

    demo = demo_image(work / "demo-cache")
    golden, payload = build_golden(demo.path, work)
    env = {"LAMINA_HOME": str(work / "home")}
    lamina(env, "init")
    lamina(env, "image", "import", "golden", str(golden))
    lamina(env, "image", "import", "demo", str(demo.path))
    lamina(env, "machine", "add", "desk", "--image", "golden")
    lamina(env, "machine", "add", "mini", "--image", "demo")
    token = lamina(env, "admin", "token").strip()
    nbd, http = free_port(), free_port()
    server = start_server(env, nbd, http)
    seed = f"nbd://127.0.0.1:{nbd}/machine/desk/seed"
    setup = Setup(work, env, token, f"http://127.0.0.1:{http}", seed, nbd, payload, golden)
    # a boot from the server records the boot profile (and warms its page cache)
    boot(f"nbd://127.0.0.1:{nbd}/machine/desk", seed, None)
    time.sleep(1.0)  # the profile is saved when the export closes
    return setup, server


def fetched_before_boot(s: Setup) -> dict[str, dict[str, Any]]:
    """On-demand reads only: what the boot itself needed."""
    out = {}
    for name, machine in (("golden", "desk"), ("demo", "mini")):
        proc, port, cache = s.stream(name, f"fetch-{name}", "--no-hydrate", "--machine", machine)
        try:
            _, status = boot(f"nbd://127.0.0.1:{port}/{name}", seed_of(port, name), cache)
        finally:
            proc.stop()
        assert status is not None
        out[name] = status
    return out


def boots(s: Setup) -> tuple[list[float], list[float], list[dict[str, Any]], Path]:
    """Empty cache (boot profile first, the rest after the boot) and complete cache,
    alternately."""
    proc, _, warm_cache = s.stream("golden", "warm", "--machine", "desk")
    try:
        while not stream_status(warm_cache)["complete"]:
            time.sleep(0.05)
    finally:
        proc.stop()
    cold: list[float] = []
    warm: list[float] = []
    cold_status: list[dict[str, Any]] = []
    for i in range(ROUNDS):
        proc, port, cache = s.stream("golden", f"cold-{i}", "--machine", "desk")
        try:
            seconds, status = boot(f"nbd://127.0.0.1:{port}/golden", seed_of(port), cache)
        finally:
            proc.stop()
        assert status is not None
        cold.append(seconds)
        cold_status.append(status)
        proc, port, cache = s.stream("golden", "warm", "--machine", "desk")
        try:
            warm.append(boot(f"nbd://127.0.0.1:{port}/golden", seed_of(port), cache)[0])
        finally:
            proc.stop()
    return cold, warm, cold_status, warm_cache


def hydration(s: Setup) -> tuple[list[float], list[float], float]:
    """Empty cache to complete, lamina and nbdkit (4 MiB blocks) alternately, then
    nbdkit once with its default 64 KiB blocks."""
    web, web_port = serve_file(s.golden)
    url = f"http://127.0.0.1:{web_port}/golden.img"
    ours: list[float] = []
    theirs: list[float] = []
    try:
        for i in range(ROUNDS):
            os.sync()
            started = time.monotonic()
            proc, _, cache = s.stream("golden", f"hydrate-{i}")
            try:
                while not stream_status(cache)["complete"]:
                    time.sleep(0.02)
                ours.append(time.monotonic() - started)
            finally:
                proc.stop()
            os.sync()
            theirs.append(nbdkit_seconds(url, s.work, "4M"))
        default = nbdkit_seconds(url, s.work, "64K")
    finally:
        web.shutdown()
    return ours, theirs, default


def offline_boot(s: Setup, cache: Path) -> float:
    """A complete cache restarted with the manager stopped (its seed from the cache too)."""
    proc, port, _ = s.stream("golden", cache.name, "--machine", "desk")
    try:
        return boot(f"nbd://127.0.0.1:{port}/golden", seed_of(port), cache)[0]
    finally:
        proc.stop()


def seed_of(port: int, image: str = "golden") -> str:
    """The machine's identity seed, as the stream endpoint exports it."""
    return f"nbd://127.0.0.1:{port}/{image}/seed"


def runs(values: list[float]) -> str:
    return f"{median(values):.2f} s (runs {', '.join(f'{v:.2f}' for v in values)})"


def main() -> None:
    need("qemu-system-x86_64", "nbdkit", "nbdcopy", "losetup", "resize2fs", "e2fsck")
    if os.geteuid() != 0:
        raise SystemExit("bench/stream_boot.py needs root (loop mounts for the golden image)")
    work = scratch("stream")
    setup, server = prepare(work)
    try:
        fetched = fetched_before_boot(setup)
        cold, warm, cold_status, warm_cache = boots(setup)
        ours, theirs, default = hydration(setup)
    finally:
        server.stop()
    offline = offline_boot(setup, warm_cache)

    g, d = fetched["golden"], fetched["demo"]
    share = g["cached_data_bytes"] / g["data_bytes"]
    print(f"golden image   {GOLDEN // MiB} MiB, {g['data_bytes'] / MiB:.0f} MiB of data "
          f"({setup.payload / MiB:.0f} MiB of application files)")  # fmt: skip
    print(f"fetched        {g['cached_data_bytes'] / MiB:.1f} MiB before the boot line "
          f"({g['fetched_bytes'] / MiB:.1f} MiB on the wire): {100 * share:.1f}% of the "
          f"data, {100 * g['cached_data_bytes'] / g['size']:.1f}% of the image")  # fmt: skip
    print(f"  demo disk    {d['cached_data_bytes'] / MiB:.1f} MiB of its "
          f"{d['data_bytes'] / MiB:.1f} MiB of data, {100 * d['cached_data_bytes'] / d['size']:.1f}%"
          " of its 64 MiB: the bare demo disk is all boot path")  # fmt: skip
    cold_fetch = median([float(s["cached_data_bytes"]) for s in cold_status]) / MiB
    print(f"boot           empty cache {runs(cold)}, {cold_fetch:.0f} MiB cached by the line")
    print(f"               complete cache {runs(warm)}; manager stopped {offline:.2f} s")
    rate_ours = GOLDEN / median(ours) / MiB
    rate_theirs = GOLDEN / median(theirs) / MiB
    print(f"hydration      lamina stream {runs(ours)} = {rate_ours:.0f} MiB/s")
    print(f"               nbdkit curl + cache, 4 MiB blocks {runs(theirs)} = "
          f"{rate_theirs:.0f} MiB/s; default 64 KiB blocks {default:.2f} s = "
          f"{GOLDEN / default / MiB:.0f} MiB/s (image bytes made local per second)")  # fmt: skip
    print(f"ratio fetched_before_boot={share:.3f} boot={median(cold) / median(warm):.2f} "
          f"hydration={rate_ours / rate_theirs:.2f}")  # fmt: skip
    run("rm", "-rf", str(work))


if __name__ == "__main__":
    main()
