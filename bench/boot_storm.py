"""Boot storm: N stateless machines on one image version, all booting at once.

    python bench/boot_storm.py [--machines 32,128] [--io-mib 128] [--stagger 1]
                               [--only lamina,nbd-server,qemu-nbd] [--store s3]
                               [--member] [--mode stateful]

The image: 1 GiB, of which the first 256 MiB is the boot set every machine reads (1 MiB
pieces alternately compressible about 2:1 and random, as an OS disk's files and its
already-compressed ones); the rest holds more of both and zeros. Each machine is one
fio job on its own connection (fio's nbd engine, iodepth 4) doing ``--io-mib`` of random
requests over the boot set: sizes from 4 KiB to 128 KiB, 85% reads, 15% writes that go
into its own copy-on-write state. Side by side, in one run, for each N:

  lamina      `lamina serve`, one `machine/NAME` export per machine (stateless)
  nbd-server  Debian's nbd-server, one export with `copyonwrite = true` (a COW file per
              client connection: how LTSP served thin clients), default worker threads
  qemu-nbd    one qemu-nbd per machine, each on its own qcow2 overlay of the raw image
  nbdkit      (``--only``, a reference rather than a peer) nbdkit's file plugin under its
              cow filter: a C server with a thread pool, one overlay for all clients

With ``--store s3`` the comparison is lamina against itself: the same storm on a home
whose chunks are in an S3 bucket (the test suite's single-node Ceph RADOS Gateway, on this
host), from a warm disk cache (one full read of the image through ``lamina serve`` fills
it first), beside a home with the local store. Both start with the page cache dropped and
with their decompressed image files cleared (the server does that at start), so the S3
home reads every chunk from its disk cache and the local one from its packs. Prints
``ratio s3/local N=...`` (target: within 10%, >= 0.9).

With ``--member`` the comparison is lamina alone against lamina as a member of a cluster
(``--server-name``: a heartbeat in the database every 5 s, and with ``--mode stateful``
the check of each machine's assigned server when its export opens): the cost of the
guarantee the cluster gives stateful machines. Prints ``ratio member/alone N=...``
(1.0: no cost). ``--mode stateful`` makes the storm's machines stateful (their writes go
into deltas kept across boots; every phase starts from empty ones).

Before lamina's first phase, two machines boot the new version as a pilot (32 MiB of
the same requests each), as an administrator tries a version before the fleet gets it:
the server records the version's boot profile and warms that boot set when a storm opens
the version (``lamina.serve.warmup``). ``--no-pilot`` leaves that out, so the N=32 phase
is the version's very first storm (later phases have the profile its boots recorded).

The machines power on at random moments within ``--stagger`` seconds (1 by default).
nbd-server loses connections in a storm unless SYN cookies are off (``Peers.nbd_server``);
they are, for its phase. Cold, as a fleet
meets it: before each server's phase the page cache is dropped (as root; everyone gets
the same), the server starts, and the storm is its first pass over the data (no
warm-up). Memory is the peak, over the phase, of the proportional set size
summed over the server's processes (shared pages counted once; RSS would count the
pages a forked nbd-server shares with its children once per child). CPU is the seconds
the server's processes used over the phase, beside the whole host's busy seconds (the
machines' fio jobs included): on a host whose cores the clients share, what the server
does not use is what the machines get.

Prints a line per server and N (before it, fio's p99 of reads and of writes apart), then
``ratio N=32 …`` (lamina's aggregate MiB/s over the
best peer's, and both p99s).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

from common import (
    LAMINA,
    MemorySampler,
    MiB,
    drop_caches,
    free_port,
    need,
    qemu_nbd_overlays,
    run,
    scratch,
    wait_export,
)

SIZE = 1024 * MiB
BOOT_SET = 256 * MiB
STORM_TIMEOUT = 600
ATTEMPTS = 2
PILOTS = 2  # machines of the pilot boot (each 32 MiB of the storm's requests)
# Request sizes of a boot (4 KiB metadata reads up to 128 KiB readahead), by share.
BSSPLIT = "4k/25:8k/15:16k/15:32k/15:64k/15:128k/15"
# Bytes mapped to 16 letters: 4 bits of entropy per byte, zstd keeps about 55% of it.
_LETTERS = bytes(b"etaoinshrdlucmfw"[i % 16] for i in range(256))


@dataclass
class Result:
    mib_s: float
    p99_ms: float
    mem_mib: float
    cpu_s: float  # the server's processes
    host_cpu_s: float  # the whole host, clients included


def build_image(path: Path) -> None:
    with open(path, "wb") as f:
        for i in range(BOOT_SET // MiB):
            piece = os.urandom(MiB)
            f.write(piece.translate(_LETTERS) if i % 2 == 0 else piece)
        for _ in range(256):
            f.write(os.urandom(MiB).translate(_LETTERS))
        f.write(bytes(256 * MiB))
        f.write(os.urandom(256 * MiB))


class Hung(Exception):
    """The storm did not finish in time (a client never got an answer)."""


class Failed(Exception):
    """A client got an error from the server (fio's last lines say which)."""


def fio_storm(uris: list[str], io_mib: int, stagger: float, work: Path) -> tuple[float, float]:
    """(aggregate MiB/s, p99 completion latency in ms over reads and writes).

    Aggregate is every machine's bytes over the storm's wall time, from fio's start to
    its last job's end. fio's own group bandwidth divides by the longest job's runtime,
    which overstates it when connections are accepted late and jobs run one after
    another (nbd-server at N=128: 2,195 MiB/s by fio's count, 13 s of wall time for
    16 GiB)."""
    lines = [
        "[global]",
        # Each machine powers on at a random moment within ``stagger`` seconds; fio starts
        # (and connects) a job only once its delay has passed.
        f"startdelay=0-{stagger}" if stagger else "startdelay=0",
        "ioengine=nbd",
        "rw=randrw",
        "rwmixread=85",
        f"bssplit={BSSPLIT}",
        f"size={BOOT_SET}",
        f"io_size={io_mib}m",
        "iodepth=4",
        "norandommap=1",
        "unified_rw_reporting=both",  # reads and writes, apart and together
        "group_reporting=1",
        "percentile_list=50:99",
    ]
    for i, uri in enumerate(uris):
        lines += [f"[m{i}]", f"uri={uri}"]
    job = work / "storm.fio"
    job.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    try:
        proc = subprocess.run(
            ["fio", "--output-format=json", str(job)],
            capture_output=True,
            text=True,
            check=False,
            timeout=STORM_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise Hung(f"not finished within {STORM_TIMEOUT} s") from None
    if proc.returncode != 0:
        raise Failed(proc.stderr.strip().splitlines()[-1][-300:] if proc.stderr.strip() else "")
    wall = time.monotonic() - started
    out = proc.stdout
    job0 = json.loads(out[out.index("{") :])["jobs"][0]
    stats = job0["mixed"]
    p99 = stats["clat_ns"]["percentile"]["99.000000"] / 1e6
    apart = [job0[k]["clat_ns"]["percentile"]["99.000000"] / 1e6 for k in ("read", "write")]
    print(f"  (p99 reads {apart[0]:.2f} ms, writes {apart[1]:.2f} ms)", flush=True)
    return stats["io_bytes"] / MiB / wall, p99


@dataclass
class Running:
    pids: list[int]
    uris: list[str]
    procs: list[subprocess.Popen[bytes]]

    def stop(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        deadline = time.monotonic() + 30
        for pid in self.pids:  # daemons are not our children: poll until they are gone
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def phase(start: Callable[[], Running], io_mib: int, stagger: float, work: Path) -> Result:
    """Drop the page cache, start the server(s), storm, stop."""
    drop_caches()
    running = start()
    try:
        for uri in dict.fromkeys(running.uris):
            wait_export(uri)
        with MemorySampler(running.pids) as mem:
            mib_s, p99 = fio_storm(running.uris, io_mib, stagger, work)
    finally:
        running.stop()
        subprocess.run(
            ["pkill", "-KILL", "-f", f"fio --output-format=json {work}/storm.fio"], check=False
        )  # the jobs of a hung storm
    return Result(mib_s, p99, mem.peak / MiB, mem.cpu_s, mem.host_cpu_s)


class Peers:
    def __init__(self, work: Path, raw: Path, store_env: dict[str, str] | None = None) -> None:
        """``store_env``: the environment of a bucket store, for a home of its own (the
        ``lamina-s3`` phase)."""
        self.work, self.raw = work, raw
        self.home = work / "home"
        self.env = {"LAMINA_HOME": str(self.home)}
        self.mode = "stateless"
        self.pilot = True
        self.s3 = Peers(work / "s3", raw) if store_env is not None else None
        if self.s3 is not None and store_env is not None:
            self.s3.work.mkdir(exist_ok=True)
            self.s3.env |= store_env

    def prepare_lamina(self, n: int) -> None:
        fresh = not (self.home / "lamina.db").exists()
        if fresh:
            run(LAMINA, "init", env=self.env)
            run(LAMINA, "image", "import", "disk", str(self.raw), env=self.env)
            if "LAMINA_STORE_URL" in self.env:
                self.warm_cache()
        code = (
            "from lamina.manager.home import open_home\n"
            "from lamina.manager.services import machines\n"
            "h = open_home()\n"
            "with h.session() as s:\n"
            "    have = {m.name for m in machines.list_all(s)}\n"
            f"    for i in range({n}):\n"
            "        if f'm{i}' not in have:\n"
            f"            machines.add(s, name=f'm{{i}}', image='disk', mac=None, mode={self.mode!r})\n"
        )
        run(str(Path(LAMINA).with_name("python")), "-c", code, env=self.env)
        if fresh and self.pilot:
            self.pilot_boots()
        shutil.rmtree(self.home / "deltas", ignore_errors=True)  # every machine boots clean

    def pilot_boots(self) -> None:
        """Before the fleet, a few machines boot the new version (a pilot, as an
        administrator tries a version before rolling it out): the server records the
        version's boot profile, which it then warms at the storm's start. The storm
        still begins cold: the page cache is dropped and the server clears its files."""
        running = self.lamina(PILOTS)
        try:
            for uri in running.uris:
                wait_export(uri)
            fio_storm(running.uris, 32, 0, self.work)
            # the profile is saved as the pilots' disks close: wait for it before stopping
            deadline = time.monotonic() + 30
            while not self.profiled() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            running.stop()

    def profiled(self) -> bool:
        with contextlib.closing(sqlite3.connect(self.home / "lamina.db")) as db:
            return bool(db.execute("SELECT count(*) FROM boot_profiles").fetchone()[0])

    def warm_cache(self) -> None:
        """Read the whole image once through `lamina serve`: every chunk comes from the
        bucket, is checked and lands in the home's disk cache."""
        running = self.lamina(1)
        try:
            uri = running.uris[0].replace("/machine/m0", "/disk")
            wait_export(uri)
            run("nbdcopy", uri, "null:")
        finally:
            running.stop()
        cached = sum(p.stat().st_size for p in (self.home / "store" / "cache").glob("*.seg"))
        print(f"  (S3 home: disk cache warm with {cached / MiB:.0f} MiB)", flush=True)

    def lamina(self, n: int, *more: str) -> Running:
        port = free_port()
        log = open(self.work / "lamina.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [LAMINA, "serve", "--no-http", "--nbd", f"127.0.0.1:{port}", *more],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=log,
        )
        uris = [f"nbd://127.0.0.1:{port}/machine/m{i}" for i in range(n)]
        return Running([proc.pid], uris, [proc])

    def lamina_member(self, n: int) -> Running:
        return self.lamina(n, "--server-name", "storm")

    def lamina_s3(self, n: int) -> Running:
        assert self.s3 is not None
        return self.s3.lamina(n)

    def nbd_server(self, n: int) -> Running:
        """nbd-server listens with a backlog of 10: in a storm its accept queue overflows.
        With SYN cookies on (the default), a client whose final ACK is then dropped holds
        an established connection the server never heard of and waits for the greeting
        for ever; off, the client's SYN is dropped and sent again a second later. So SYN
        cookies are turned off for this phase (as root), and on again after it."""
        port = free_port()
        cow = self.work / "cow"
        shutil.rmtree(cow, ignore_errors=True)
        cow.mkdir()
        conf = self.work / "nbd-server.conf"
        conf.write_text(
            f"[generic]\nlistenaddr = 127.0.0.1\nport = {port}\n"
            f"[disk]\nexportname = {self.raw}\ncopyonwrite = true\ncowdir = {cow}\n"
        )
        pidfile = self.work / "nbd-server.pid"
        pidfile.unlink(missing_ok=True)
        # It daemonizes (its -d serves one client only) and forks a process per client.
        run("nbd-server", "-C", str(conf), "-p", str(pidfile))
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        return Running([pid], [f"nbd://127.0.0.1:{port}/disk"] * n, [])

    def nbdkit(self, n: int) -> Running:
        """A reference, not a peer: nbdkit's file plugin under its cow filter, in C with a
        thread pool, one copy-on-write overlay for every client (so not the workload's
        isolation). What a lean multi-threaded server gets from this host's cores beside
        the clients: a ceiling for any server here."""
        port = free_port()
        proc = subprocess.Popen(
            [
                "nbdkit",
                "-f",
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "--filter=cow",
                "file",
                str(self.raw),
            ],
            stderr=subprocess.DEVNULL,
        )
        return Running([proc.pid], [f"nbd://127.0.0.1:{port}/"] * n, [proc])

    def qemu_nbd(self, n: int) -> Running:
        procs, uris = qemu_nbd_overlays(self.raw, self.work, n)
        return Running([p.pid for p in procs], uris, procs)


@contextlib.contextmanager
def syncookies(value: str) -> Iterator[None]:
    """net.ipv4.tcp_syncookies set to ``value`` for the block (when permitted)."""
    knob = Path("/proc/sys/net/ipv4/tcp_syncookies")
    try:
        old = knob.read_text()
        knob.write_text(value)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        knob.write_text(old)


def attempts(
    name: str, start: Callable[[], Running], io_mib: int, stagger: float, work: Path
) -> Result:
    """A phase, once more if it hung (a client never answered: see ``Peers.nbd_server``)
    or a client got an error."""
    for attempt in range(ATTEMPTS):
        try:
            with syncookies("0") if name == "nbd-server" else contextlib.nullcontext():
                return phase(start, io_mib, stagger, work)
        except (Hung, Failed) as exc:
            if attempt == ATTEMPTS - 1:
                raise
            print(f"  ({name}: {type(exc).__name__.lower()}: {exc}; once more)", flush=True)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def bucket_store(work: Path, wanted: bool) -> Iterator[dict[str, str] | None]:
    """The environment of a bucket on a single-node Ceph cluster started here, or None."""
    if not wanted:
        yield None
        return
    need("radosgw", "ceph-osd", "ceph-mon")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test suite's cluster
    from tests.ceph import CephCluster

    cluster = CephCluster(work / "ceph").start()
    try:
        cluster.create_bucket("storm")
        yield cluster.env("storm", "fleet")
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--machines", default="32,128")
    parser.add_argument("--io-mib", type=int, default=128, help="bytes each machine moves")
    parser.add_argument(
        "--only", default=None, help="[lamina,nbd-server,qemu-nbd] (and nbdkit, a reference)"
    )
    parser.add_argument(
        "--stagger", type=float, default=1.0, help="seconds over which the machines power on"
    )
    parser.add_argument(
        "--member",
        action="store_true",
        help="lamina alone against lamina as a cluster member (--server-name)",
    )
    parser.add_argument("--mode", choices=("stateless", "stateful"), default="stateless")
    parser.add_argument(
        "--no-pilot",
        action="store_true",
        help="no pilot boot: lamina meets the version's first storm with no boot profile",
    )
    parser.add_argument(
        "--store",
        choices=("local", "s3"),
        default="local",
        help="s3: lamina on a bucket store (warm disk cache) against lamina on a local one",
    )
    args = parser.parse_args()
    need("fio", "nbd-server", "qemu-nbd", "qemu-img", "nbdinfo")
    if os.geteuid() != 0:
        print("warning: not root, the page cache is not dropped between phases (not cold)")
    default = "lamina,lamina-s3" if args.store == "s3" else "lamina,nbd-server,qemu-nbd"
    if args.member:
        default = "lamina,lamina-member,lamina,lamina-member"  # alternating: drift shows
    systems = (args.only or default).split(",")
    work = scratch("storm")
    raw = work / "disk.raw"
    build_image(raw)
    with bucket_store(work, "lamina-s3" in systems) as store_env:
        peers = Peers(work, raw, store_env)
        peers.mode = args.mode
        peers.pilot = not args.no_pilot
        table = storms(peers, systems, args, work)
    print("ratio " + " ".join(ratios(table)))
    shutil.rmtree(work, ignore_errors=True)


def storms(
    peers: Peers, systems: list[str], args: argparse.Namespace, work: Path
) -> dict[int, dict[str, Result]]:
    table: dict[int, dict[str, Result]] = {}
    for n in (int(x) for x in args.machines.split(",")):
        row = table[n] = {}
        for name in systems:
            if name in ("lamina", "lamina-member"):
                peers.prepare_lamina(n)
            if name == "lamina-s3" and peers.s3 is not None:
                peers.s3.prepare_lamina(n)
            start = {
                "lamina": peers.lamina,
                "lamina-s3": peers.lamina_s3,
                "lamina-member": peers.lamina_member,
                "nbd-server": peers.nbd_server,
                "qemu-nbd": peers.qemu_nbd,
                "nbdkit": peers.nbdkit,
            }[name]
            try:
                r = attempts(name, functools.partial(start, n), args.io_mib, args.stagger, work)
            except (Hung, Failed) as exc:
                print(f"N={n:<4d} {name:10s} {type(exc).__name__.lower()}: {exc}", flush=True)
                continue
            show(n, name, r)
            if name in row:  # a second run of the same system: the mean of both
                pairs = zip(astuple(row[name]), astuple(r), strict=True)
                r = Result(*((x + y) / 2 for x, y in pairs))
                show(n, name + ", mean", r)
            row[name] = r
            time.sleep(1)
    return table


def show(n: int, name: str, r: Result) -> None:
    print(
        f"N={n:<4d} {name:10s} {r.mib_s:8.0f} MiB/s  p99 {r.p99_ms:7.2f} ms  "
        f"server memory {r.mem_mib:7.1f} MiB  CPU s server {r.cpu_s:5.1f} host {r.host_cpu_s:5.1f}",
        flush=True,
    )


def ratios(table: dict[int, dict[str, Result]]) -> list[str]:
    parts = []
    for n, row in table.items():
        if "lamina" in row and "lamina-member" in row:
            member, alone = row["lamina-member"], row["lamina"]
            parts.append(
                f"member/alone N={n}={member.mib_s / alone.mib_s:.2f}x "
                f"p99={member.p99_ms:.1f}/{alone.p99_ms:.1f}ms"
            )
        if "lamina" in row and "lamina-s3" in row:
            s3, local = row["lamina-s3"], row["lamina"]
            parts.append(
                f"s3/local N={n}={s3.mib_s / local.mib_s:.2f}x "
                f"p99={s3.p99_ms:.1f}/{local.p99_ms:.1f}ms"
            )
        if "lamina" in row and "nbdkit" in row:
            ceiling = row["nbdkit"]
            parts.append(
                f"lamina/nbdkit N={n}={row['lamina'].mib_s / ceiling.mib_s:.2f}x "
                f"p99={row['lamina'].p99_ms:.1f}/{ceiling.p99_ms:.1f}ms"
            )
        peers_only = {k: v for k, v in row.items() if not k.startswith("lamina") and k != "nbdkit"}
        if "lamina" not in row or not peers_only:
            continue
        best_name, best = max(peers_only.items(), key=lambda kv: kv[1].mib_s)
        ours = row["lamina"]
        parts.append(
            f"N={n}={ours.mib_s / best.mib_s:.2f}x({best_name}) "
            f"p99={ours.p99_ms:.1f}/{best.p99_ms:.1f}ms"
        )
    return parts


if __name__ == "__main__":
    main()
