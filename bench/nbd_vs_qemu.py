"""NBD throughput: lamina serve vs qemu-nbd, with fio's nbd engine, in one run.

  cold_read   one sequential pass of 1 MiB reads, iodepth 8, over the whole image right
              after import, no warm-up: the page cache is dropped first (as root) and the
              server is fresh; read-only export vs qemu-nbd on the raw file
  cold_cached the same first pass of a fresh server with its files (packs, raw file) in
              the page cache: the server's own cold path (index, verification,
              decompression) against reading a cached raw file
  seq_read    1 MiB sequential reads, iodepth 8, read-only export vs qemu-nbd on the raw file
  rand_read   4 KiB random reads, iodepth 16, same exports
  rand_write  4 KiB random writes, iodepth 16, machine/NAME (fresh delta) vs qemu-nbd on a
              fresh qcow2 overlay of the raw file
  seq_read_tls, rand_read_tls
              the two reads over TLS: `lamina serve --tls` vs `qemu-nbd --tls-creds` on the
              raw file, both with the home CA's server certificate, fio (libnbd) showing an
              admin client certificate (nbds:// URIs)
  member_rand_write
              the cost of the stateful guarantee of a cluster: the same random writes on
              machine/NAME (a fresh delta each) from `lamina serve` alone and as a member of
              a cluster (`--server-name`: a heartbeat in the database every 5 s, the
              machine's assigned server checked at each open), alternately, twice each;
              then a planned `lamina machine move` of the delta the writes left, timed
              beside copying the qcow2 overlay of qemu's random writes (`cp`, then `sync FILE`)

The cold pairs run first; the others run back to back after a warm-up pass.
``LAMINA_BENCH_PAIRS`` picks some of them (``cold``, ``plain``, ``tls``, ``member``: all by
default),
``LAMINA_BENCH_RUNTIME`` the seconds of each timed job (10). The last
line is ``ratio cold_read=… cold_cached=… seq_read=… rand_read=… rand_write=…
seq_read_tls=… rand_read_tls=… member_rand_write=…`` (lamina / qemu-nbd, higher is
better; for member_rand_write the member over lamina alone, 1.0 is no cost).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from common import LAMINA, MiB, drop_caches, free_port, need, run, scratch, wait_export

SIZE = 1024 * MiB
RUNTIME = int(os.environ.get("LAMINA_BENCH_RUNTIME", "10"))
# Which pairs run (LAMINA_BENCH_PAIRS=tls: the TLS column alone), all by default.
PAIRS = os.environ.get("LAMINA_BENCH_PAIRS", "cold,plain,tls,member").split(",")


# fio's nbd engine cannot name a TLS credentials folder in its URI (libnbd allows that
# only to callers that opt in), so over TLS it runs as an unprivileged user whose HOME
# holds the credential where libnbd looks by default: $HOME/.pki/libnbd.
NOBODY = 65534


def fio(
    uri: str,
    rw: str,
    bs: str,
    depth: int,
    runtime: int | None = RUNTIME,
    *,
    home: Path | None = None,
) -> float:
    """IOPS of one fio job (MiB/s = IOPS x bs); ``runtime`` None: one pass, no ramp;
    ``home``: run as nobody with that HOME."""
    user = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    prefix = [*user, "env", f"HOME={home}"] if home is not None else []
    timing = (
        [f"--runtime={runtime}", "--time_based", "--ramp_time=2"] if runtime is not None else []
    )
    out = subprocess.run(
        [
            *prefix,
            "fio",
            "--name=b",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={depth}",
            f"--size={SIZE}",
            *timing,
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return float(side["iops"])


def lamina_serve(port: int, env: dict[str, str], *tls: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [LAMINA, "serve", "--no-http", "--nbd", f"127.0.0.1:{port}", *tls],
        env={**os.environ, **env},
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def member_pairs(env: dict[str, str], home: Path, overlay: Path) -> Results:
    """Random writes on the stateful machine from `lamina serve` alone and as a cluster
    member (alternating, fresh delta each, the mean of two runs each), then a planned
    move of the member's delta to another server (registered in the database only)."""
    port = free_port()
    uri = f"nbd://127.0.0.1:{port}/machine/bench"
    member = ("--server-name", "a")
    runs: dict[bool, list[float]] = {False: [], True: []}
    for joined in (False, True, False, True):
        shutil.rmtree(home / "deltas", ignore_errors=True)
        proc = lamina_serve(port, env, *(member if joined else ()))
        try:
            wait_export(uri)
            runs[joined].append(fio(uri, "randwrite", "4k", 16))
            if joined and len(runs[True]) == 2:
                move(env, home, overlay)  # while `a` is live: the machine is off
        finally:
            stop([proc])
    return {"member_rand_write": (sum(runs[True]) / 2, sum(runs[False]) / 2)}


def move(env: dict[str, str], home: Path, overlay: Path) -> None:
    """`lamina machine move` of the delta the writes left (committed into the store as
    image bench.state) beside copying qemu's overlay of the same writes."""
    register = (
        "from lamina.manager.home import open_home\n"
        "from lamina.manager.services import servers\n"
        "with open_home().session() as s:\n"
        "    servers.register(s, name='b', nbd_address='127.0.0.1:9', heartbeat=3600)\n"
    )
    run(str(Path(LAMINA).with_name("python")), "-c", register, env=env)
    delta = sum(p.stat().st_blocks * 512 for p in (home / "deltas").rglob("*") if p.is_file())
    started = time.perf_counter()
    run(LAMINA, "machine", "move", "bench", "--to", "b", env=env)
    moved = time.perf_counter() - started
    copy = overlay.with_suffix(".copy")
    started = time.perf_counter()
    run("cp", "--sparse=always", str(overlay), str(copy))
    run("sync", str(copy))  # that file only: a system-wide sync would time others' writes
    copied = time.perf_counter() - started
    size = overlay.stat().st_blocks * 512
    copy.unlink()
    print(
        f"move          lamina machine move: delta {delta / MiB:.0f} MiB in {moved:.2f} s;"
        f" cp + fsync of qemu's overlay ({size / MiB:.0f} MiB): {copied:.2f} s",
        flush=True,
    )


def qemu_nbd(port: int, fmt: str, path: Path, *more: str) -> subprocess.Popen[bytes]:
    ro = ["-r"] if fmt == "raw" else []
    return subprocess.Popen(
        ["qemu-nbd", "-f", fmt, *ro, "-x", "disk", "-b", "127.0.0.1", "-p", str(port),
         "--persistent", "-t", *more, str(path)]
    )  # fmt: skip


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


Results = dict[str, tuple[float, float]]


def read_file(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def cold_pairs(env: dict[str, str], home: Path, raw: Path) -> Results:
    """The first pass over the data of a fresh server: from the disk (page cache dropped
    for each), then with its files cached (a fresh server again)."""
    ports = {name: free_port() for name in ("lamina", "raw")}
    lamina_uri = f"nbd://127.0.0.1:{ports['lamina']}/disk"
    qemu_uri = f"nbd://127.0.0.1:{ports['raw']}/disk"
    qemu = qemu_nbd(ports["raw"], "raw", raw)
    try:
        out = []
        for files in ([], [raw, *sorted((home / "store").rglob("*.pack"))]):
            lamina = lamina_serve(ports["lamina"], env)
            try:
                for uri in (lamina_uri, qemu_uri):
                    wait_export(uri)
                for uri in (lamina_uri, qemu_uri):
                    if files:
                        for path in files:
                            read_file(path)
                    else:
                        drop_caches()
                    out.append(fio(uri, "read", "1M", 8, runtime=None))
            finally:
                stop([lamina])
        return {"cold_read": (out[0], out[1]), "cold_cached": (out[2], out[3])}
    finally:
        stop([qemu])


def plain_pairs(env: dict[str, str], raw: Path, overlay: Path) -> Results:
    ports = {name: free_port() for name in ("lamina", "raw", "qcow2")}
    procs = [
        lamina_serve(ports["lamina"], env),
        qemu_nbd(ports["raw"], "raw", raw),
        qemu_nbd(ports["qcow2"], "qcow2", overlay),
    ]
    try:
        lamina_ro = f"nbd://127.0.0.1:{ports['lamina']}/disk"
        lamina_rw = f"nbd://127.0.0.1:{ports['lamina']}/machine/bench"
        qemu_ro = f"nbd://127.0.0.1:{ports['raw']}/disk"
        qemu_rw = f"nbd://127.0.0.1:{ports['qcow2']}/disk"
        for uri in (lamina_ro, qemu_ro, qemu_rw):
            wait_export(uri)
        for uri in (lamina_ro, qemu_ro):  # warm: lamina's chunk cache, the page cache
            fio(uri, "read", "1M", 8, runtime=3)
        return {
            "seq_read": (fio(lamina_ro, "read", "1M", 8), fio(qemu_ro, "read", "1M", 8)),
            "rand_read": (fio(lamina_ro, "randread", "4k", 16), fio(qemu_ro, "randread", "4k", 16)),
            "rand_write": (
                fio(lamina_rw, "randwrite", "4k", 16),
                fio(qemu_rw, "randwrite", "4k", 16),
            ),
        }
    finally:
        stop(procs)


def tls_pairs(env: dict[str, str], home: Path, raw: Path, fio_home: Path) -> Results:
    """The reads over TLS. lamina starts first: it writes the server certificate (for
    127.0.0.1, from the home's CA) that qemu-nbd is given too; fio shows the admin's."""
    creds = fio_home / ".pki" / "libnbd"
    run(LAMINA, "admin", "credentials", "--out", str(creds), env=env)
    run("chown", "-R", f"{NOBODY}:{NOBODY}", str(fio_home))
    ports = {name: free_port() for name in ("lamina", "raw")}
    lamina_uri = f"nbds://127.0.0.1:{ports['lamina']}/disk"
    qemu_uri = f"nbds://127.0.0.1:{ports['raw']}/disk"
    procs = [lamina_serve(ports["lamina"], env, "--tls")]
    try:
        wait_export(f"{lamina_uri}?tls-certificates={creds}")
        server = f"tls-creds-x509,id=tls0,endpoint=server,dir={home / 'tls'},verify-peer=on"
        procs.append(qemu_nbd(ports["raw"], "raw", raw, "--object", server, "--tls-creds", "tls0"))
        wait_export(f"{qemu_uri}?tls-certificates={creds}")
        for uri in (lamina_uri, qemu_uri):
            fio(uri, "read", "1M", 8, runtime=3, home=fio_home)
        return {
            "seq_read_tls": (
                fio(lamina_uri, "read", "1M", 8, home=fio_home),
                fio(qemu_uri, "read", "1M", 8, home=fio_home),
            ),
            "rand_read_tls": (
                fio(lamina_uri, "randread", "4k", 16, home=fio_home),
                fio(qemu_uri, "randread", "4k", 16, home=fio_home),
            ),
        }
    finally:
        stop(procs)


def main() -> None:
    need("fio", "qemu-nbd", "qemu-img", "nbdinfo", "setpriv")
    work = scratch("nbd")
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        for _ in range(SIZE // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    home = work / "home"
    env = {"LAMINA_HOME": str(home)}
    run(LAMINA, "init", env=env)
    run(LAMINA, "image", "import", "disk", str(raw), env=env)
    run(LAMINA, "machine", "add", "bench", "--image", "disk", "--mode", "stateful", env=env)
    overlay = work / "overlay.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(overlay))

    results: Results = {}
    if "cold" in PAIRS:
        results |= cold_pairs(env, home, raw)
    if "plain" in PAIRS:
        results |= plain_pairs(env, raw, overlay)
    if "tls" in PAIRS:
        results |= tls_pairs(env, home, raw, work / "fio-home")
    if "member" in PAIRS:
        results |= member_pairs(env, home, overlay)
    for name, (ours, theirs) in results.items():
        unit = "MiB/s" if "seq" in name or "cold" in name else "IOPS"  # 1 MiB: IOPS = MiB/s
        us, them = ("member", "alone") if name.startswith("member") else ("lamina", "qemu-nbd")
        print(f"{name:13s} {us} {ours:10.0f} {unit}   {them} {theirs:10.0f} {unit}")
    print("ratio " + " ".join(f"{k}={v[0] / v[1]:.2f}" for k, v in results.items()))
    run("rm", "-rf", str(work))


if __name__ == "__main__":
    main()
