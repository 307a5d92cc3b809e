"""First use of an app layer on hosts that never saw it: lazily attached vs fetched whole.

    python bench/layer_first_use.py [--size-mib 2048] [--small 20000] [--opens 0.03]

Set-up (not timed): a manager (``lamina serve``, real HTTP on loopback) holding an app
layer of ``--size-mib`` MiB: four large files and ``--small`` small ones (1-8 KiB, random
bytes so nothing compresses away); alice entitled to it; its EROFS image built once, as the
manager does on the first demand (timed and printed apart). The app's start set: the first
4 MiB of its largest file (its "binary") and ``--opens`` of the small files, picked at
random (seeded), read in one order.

Three hosts, each a real ``lamina agent`` with its own home, log alice in through the
agent's control socket, then read the start set from her composed root:

- today's path (no ``--lazy-layers``): the login fetches every chunk of the layer, writes
  the tree out and builds its image before mounting;
- the first lazy host: the login fetches the layer's metadata, the start set's chunks
  arrive as they are read; its logout uploads the order they were first read in;
- the second lazy host: fetches that read-ahead profile in batches as soon as it attaches.

Printed: per host, login to first read (the binary's first 4 MiB) and to the whole start
set, and the bytes the host fetched (lazy hosts: its image cache's figures). R is the
first lazy host's start-set time over the second's. Last line:

    first use: A ms to first read, F% of the layer fetched, second host R.Rx faster (today's path: B ms)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LAMINA, MiB, free_port, need, run, scratch, wait_port

from lamina.agent.host import request
from lamina.home import Home

HEAD = 4 * MiB  # what the app reads of its binary first


def make_layer(src: Path, size: int, small: int, seed: int) -> list[str]:
    """Write the layer's tree; returns every file's path (relative), large ones first."""
    rng = random.Random(seed)
    files: list[str] = []
    small_sizes = [rng.randint(1024, 8192) for _ in range(small)]
    large_each = max(HEAD, (size - sum(small_sizes)) // 4)
    (src / "opt/app/bin").mkdir(parents=True)
    block = 8 * MiB
    for i in range(4):
        rel = f"opt/app/bin/part{i}.bin"
        with open(src / rel, "wb") as f:
            left = large_each
            while left > 0:
                f.write(os.urandom(min(block, left)))
                left -= block
        files.append(rel)
    for n, length in enumerate(small_sizes):
        rel = f"opt/app/share/d{n // 500:03d}/f{n:05d}.dat"
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(length))
        files.append(rel)
    return files


class Host:
    """A ``lamina agent`` process on its own home."""

    def __init__(self, base: Path, url: str, token: str, *, lazy: bool) -> None:
        self.home = base / "home"
        self.root = self.home / "sessions"
        self.env = {**os.environ, "LAMINA_HOME": str(self.home)}
        base.mkdir(parents=True)
        cmd = [LAMINA, "agent", "--manager", url, "--token", token, "--etc", str(base / "etc")]
        cmd += ["--lazy-layers"] if lazy else []
        with open(base / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)
        sock = self.home / "run" / "agent.sock"
        deadline = time.monotonic() + 60
        log = base / "agent.log"
        while not sock.exists() or b'"booted"' not in log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"agent did not start: {log.read_text()}")
            time.sleep(0.05)
        time.sleep(2)  # its first look at the manager's desired state, done before a login

    def ask(self, op: str, user: str) -> dict[str, Any]:
        """What ``lamina agent login`` does, without its process start (the same for
        every host, and not the layer's doing)."""
        home = Home(self.home)
        try:
            return request(home, op, user)
        finally:
            home.close()

    def lazy_figures(self) -> dict[str, Any]:
        out = run(LAMINA, "agent", "status", "--json", env=self.env)
        layers = json.loads(out)["lazy_layers"]
        return layers[0] if layers else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def read_start_set(root: Path, start: list[str]) -> tuple[float, float]:
    """(seconds to the binary's head, seconds to the whole start set), from now."""
    t0 = time.perf_counter()
    with open(root / start[0], "rb") as f:
        f.read(HEAD)
    first = time.perf_counter() - t0
    for rel in start[1:]:
        (root / rel).read_bytes()
    return first, time.perf_counter() - t0


def first_use(host: Host, start: list[str]) -> dict[str, float]:
    t0 = time.perf_counter()
    host.ask("login", "alice")
    login = time.perf_counter() - t0
    first, whole = read_start_set(host.root / "alice", start)
    return {"login": login, "first": login + first, "start_set": login + whole}


def unmount_under(base: Path) -> None:
    from lamina.layer.overlay import mountinfo

    for _ in range(3):
        mine = [m.mountpoint for m in mountinfo() if m.mountpoint.startswith(str(base))]
        for point in reversed(mine):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def set_up(base: Path, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """The layer, three machines, alice entitled; the app's start set."""
    started = time.perf_counter()
    files = make_layer(base / "src", args.size_mib * MiB, args.small, args.seed)
    rng = random.Random(args.seed)
    picks = rng.sample(files[4:], max(1, round(args.opens * len(files[4:]))))
    raw = base / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(MiB)
    run(LAMINA, "image", "import", "base", str(raw), env=env)
    tokens = {}
    for m in ("today", "first", "second"):
        out = run(LAMINA, "machine", "add", m, "--image", "base", "--json", env=env)
        tokens[m] = json.loads(out)["token"]
    imported = json.loads(
        run(LAMINA, "layer", "import", "app", str(base / "src"), "--json", env=env)
    )
    run(LAMINA, "user", "add", "alice", env=env)
    run(LAMINA, "entitle", "app", "--user", "alice", env=env)
    start = [files[0], *picks]
    print(
        f"layer: {imported['size'] / MiB:.0f} MiB, {imported['files']} files, start set "
        f"{len(start)} files; set-up {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return {
        "start": start,
        "tokens": tokens,
        "size": int(imported["size"]),
        "admin": run(LAMINA, "admin", "token", env=env).strip(),
    }


def image_info(url: str, admin: str) -> dict[str, Any]:
    import httpx

    answer = httpx.get(
        f"{url}/api/v1/layers/app/versions/1/image",
        headers={"Authorization": f"Bearer {admin}"},
        timeout=3600,
    )
    info: dict[str, Any] = answer.json()
    return info


def try_hosts(base: Path, url: str, fleet: dict[str, Any], hosts: list[Host]) -> str:
    results: dict[str, dict[str, float]] = {}
    for name, lazy in (("today", False), ("first", True), ("second", True)):
        host = Host(base / name, url, fleet["tokens"][name], lazy=lazy)
        hosts.append(host)
        r = results[name] = first_use(host, fleet["start"])
        r["fetched"] = host.lazy_figures().get("fetched_bytes", 0) if lazy else fleet["size"]
        host.ask("logout", "alice")
        if name == "first":  # the profile its logout uploaded
            profile = image_info(url, fleet["admin"])["profile"]
            print(f"read-ahead profile: {len(profile)} chunks", flush=True)
        print(
            f"{name:>6}: login {r['login'] * 1000:.0f} ms, first read "
            f"{r['first'] * 1000:.0f} ms, start set {r['start_set'] * 1000:.0f} ms, "
            f"fetched {r['fetched'] / MiB:.1f} MiB",
            flush=True,
        )
    a = results["first"]["first"] * 1000
    f_pct = 100 * results["first"]["fetched"] / fleet["size"]
    ratio = results["first"]["start_set"] / results["second"]["start_set"]
    b = results["today"]["first"] * 1000
    return (
        f"first use: {a:.0f} ms to first read, {f_pct:.1f}% of the layer fetched, "
        f"second host {ratio:.1f}x faster (today's path: {b:.0f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--opens", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    need("mkfs.erofs")
    if os.geteuid() != 0:
        raise SystemExit("needs root (mounts)")
    base = scratch("layer-first-use")
    env = {"LAMINA_HOME": str(base / "manager")}
    hosts: list[Host] = []
    server: subprocess.Popen[bytes] | None = None
    try:
        fleet = set_up(base, env, args)
        port = free_port()
        cmd = [LAMINA, "serve", "--no-nbd", "--http", f"127.0.0.1:{port}"]
        with open(base / "serve.log", "ab") as log:
            server = subprocess.Popen(
                cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
            )
        wait_port(port, server)
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        image_info(url, fleet["admin"])
        print(f"image built once on the manager: {time.perf_counter() - t0:.1f} s", flush=True)
        last = try_hosts(base, url, fleet, hosts)
        print("(measured on a host shared with other work: figures vary between runs)")
        print(last)
    finally:
        for host in hosts:
            host.stop()
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        unmount_under(base)


if __name__ == "__main__":
    main()
