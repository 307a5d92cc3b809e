"""Helpers shared by the benchmarks: scratch space, timing, the lamina CLI."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

LAMINA = str(Path(sys.executable).with_name("lamina"))
MiB = 1 << 20


def scratch(name: str) -> Path:
    """A fresh scratch folder on the same filesystem as the repository's parent."""
    base = Path(os.environ.get("LAMINA_BENCH_DIR", tempfile.gettempdir())) / f"lamina-bench-{name}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    return base


def run(*cmd: str, env: dict[str, str] | None = None, quiet: bool = True) -> str:
    proc = subprocess.run(
        list(cmd), env={**os.environ, **(env or {})}, capture_output=quiet, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout or ""


def timed(prepare: Callable[[], None], action: Callable[[], None]) -> float:
    """Seconds for ``action`` after ``prepare`` (not timed) and a sync of dirty pages."""
    prepare()
    os.sync()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def du(path: Path) -> int:
    """Apparent bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (run `make install`)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until something listens on ``port`` (30 s at most; ``proc`` must stay alive)."""
    for _ in range(600):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process on port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def wait_export(uri: str) -> None:
    """Until the export answers a real NBD handshake (a bare TCP probe makes qemu-nbd
    complain about a failed negotiation)."""
    for _ in range(600):
        probe = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.05)
    raise SystemExit(f"{uri} does not answer")


def qemu_nbd_overlays(
    raw: Path, work: Path, n: int
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """``n`` new qcow2 overlays of ``raw`` in ``work``, each served by its own qemu-nbd
    (as a fleet of linked clones would be): the processes and their URLs."""
    procs, uris = [], []
    for i in range(n):
        overlay = work / f"overlay{i}.qcow2"
        overlay.unlink(missing_ok=True)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(overlay))
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    "qemu-nbd",
                    "-f",
                    "qcow2",
                    "-x",
                    "disk",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "--persistent",
                    "-t",
                    str(overlay),
                ],
                stderr=subprocess.DEVNULL,
            )
        )
        uris.append(f"nbd://127.0.0.1:{port}/disk")
    return procs, uris


def drop_caches() -> bool:
    """Write back and drop the page cache (root only): the next read of any file comes
    from the disk. Returns False when not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size summed over ``pids``: shared pages (a forked server's, the
    interpreter's) counted once in total, not once per process as RSS would."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue  # gone meanwhile
    return total


def cpu_ticks(pid: int) -> int | None:
    """User and system time of a live process, in clock ticks (None: it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def host_busy_ticks() -> int:
    """Clock ticks all CPUs spent on anything but idle and I/O wait, since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4]


class MemorySampler:
    """The peak of ``pss_bytes`` over the process trees of ``roots``, sampled on a thread
    every ``interval`` seconds until ``stop``; and the CPU time those processes used
    meanwhile (``cpu_s``: from the first sample, or a process's start if later, to the
    last figure seen of each, so a process that ended between samples loses at most
    ``interval``) beside the whole host's busy time (``host_cpu_s``)."""

    def __init__(self, roots: list[int], interval: float = 0.5) -> None:
        self.roots, self.interval = roots, interval
        self.peak = 0
        self.cpu_s = self.host_cpu_s = 0.0
        self._ticks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        host = host_busy_ticks()
        before: dict[int, int] = {}  # what the processes there at the start had used
        first = True
        while True:
            pids = [p for root in self.roots for p in process_tree(root)]
            self.peak = max(self.peak, pss_bytes(pids))
            for pid in pids:
                ticks = cpu_ticks(pid)
                if ticks is not None:
                    self._ticks[pid] = ticks
                    if first:
                        before[pid] = ticks
            first = False
            self.cpu_s = (sum(self._ticks.values()) - sum(before.values())) / hz
            self.host_cpu_s = (host_busy_ticks() - host) / hz
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
