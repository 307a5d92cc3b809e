"""NBD throughput: lamina serve vs qemu-nbd, with fio's nbd engine, in one run.

  seq_read    1 MiB sequential reads, iodepth 8, read-only export vs qemu-nbd on the raw file
  rand_read   4 KiB random reads, iodepth 16, same exports
  rand_write  4 KiB random writes, iodepth 16, machine/NAME (fresh delta) vs qemu-nbd on a
              fresh qcow2 overlay of the raw file

Each pair runs back to back after a warm-up pass; the last line is
``ratio seq_read=… rand_read=… rand_write=…`` (lamina / qemu-nbd, higher is better).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from common import LAMINA, MiB, free_port, need, run, scratch

SIZE = 1024 * MiB
RUNTIME = int(os.environ.get("LAMINA_BENCH_RUNTIME", "10"))


def wait_export(uri: str) -> None:
    """Until the export answers a real NBD handshake (a bare TCP probe makes qemu-nbd
    complain about a failed negotiation)."""
    for _ in range(400):
        probe = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.05)
    raise SystemExit(f"{uri} does not answer")


def fio(uri: str, rw: str, bs: str, depth: int, runtime: int = RUNTIME) -> float:
    """IOPS of one fio job (MiB/s = IOPS x bs)."""
    out = subprocess.run(
        [
            "fio",
            "--name=b",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={depth}",
            f"--size={SIZE}",
            f"--runtime={runtime}",
            "--time_based",
            "--ramp_time=2",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return float(side["iops"])


def main() -> None:
    need("fio", "qemu-nbd", "qemu-img", "nbdinfo")
    work = scratch("nbd")
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        for _ in range(SIZE // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    home = work / "home"
    env = {"LAMINA_HOME": str(home)}
    run(LAMINA, "image", "import", "disk", str(raw), env=env)
    run(LAMINA, "machine", "add", "bench", "--image", "disk", "--mode", "stateful", env=env)
    overlay = work / "overlay.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(overlay))

    ports = {name: free_port() for name in ("lamina", "raw", "qcow2")}
    procs = [
        subprocess.Popen(
            [
                LAMINA,
                "serve",
                "--no-http",
                "--nbd",
                f"127.0.0.1:{ports['lamina']}",
                "--cache-mib",
                str(SIZE // MiB + 256),
            ],
            env={**os.environ, **env},
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                "qemu-nbd",
                "-f",
                "raw",
                "-r",
                "-x",
                "disk",
                "-b",
                "127.0.0.1",
                "-p",
                str(ports["raw"]),
                "--persistent",
                "-t",
                str(raw),
            ]
        ),
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
                str(ports["qcow2"]),
                "--persistent",
                "-t",
                str(overlay),
            ]
        ),
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
        results = {
            "seq_read": (fio(lamina_ro, "read", "1M", 8), fio(qemu_ro, "read", "1M", 8)),
            "rand_read": (fio(lamina_ro, "randread", "4k", 16), fio(qemu_ro, "randread", "4k", 16)),
            "rand_write": (
                fio(lamina_rw, "randwrite", "4k", 16),
                fio(qemu_rw, "randwrite", "4k", 16),
            ),
        }
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    for name, (ours, theirs) in results.items():
        unit = "MiB/s" if name == "seq_read" else "IOPS"  # 1 MiB blocks: IOPS = MiB/s
        print(f"{name:10s} lamina {ours:10.0f} {unit}   qemu-nbd {theirs:10.0f} {unit}")
    print("ratio " + " ".join(f"{k}={v[0] / v[1]:.2f}" for k, v in results.items()))
    run("rm", "-rf", str(work))


if __name__ == "__main__":
    main()
